"""Export SAM2's image predictor to two ONNX graphs that ONNX Runtime runs on the CPU:

- `encoder.onnx`: image [1, 3, S, S] (prepared as the data layer prepares it) -> image_embed [1, 256, S/16,
  S/16], high_res_feats_0 [1, 32, S/4, S/4], high_res_feats_1 [1, 64, S/8, S/8] (what sam2's image predictor
  keeps after `set_image`);
- `decoder.onnx`: those three maps, point_coords [1, P, 2] (pixels of the S x S input) and point_labels [1, P]
  (1 foreground, 0 background, 2/3 a box's corners) -> masks [1, M, S, S] (logits), iou_predictions [1, M],
  low_res_masks [1, M, S/4, S/4]; P is dynamic, M is 1 (3 with `multimask_output`). This is the prompt
  encoder and the mask decoder of sam2's `SAM2ImagePredictor._predict`, with the mask upsampled to the input.

A quantized model's layers are first swapped for their export-ready form (`mqsam2.deploy.onnx.layers`); a
float model exports as it is (the fp32 reference the benchmark compares against).
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from mqsam2.deploy.onnx.layers import OnnxExportConfig, OnnxLayerReport, to_export_layers
from mqsam2.deploy.onnx.ops import OPSET, TRANSLATIONS
from mqsam2.errors import MQSAM2Error
from mqsam2.models import image_features
from mqsam2.quant.swap import bit_plan, is_quantized

ENCODER_FILE, DECODER_FILE = "encoder.onnx", "decoder.onnx"
ENCODER_OUTPUTS = ("image_embed", "high_res_feats_0", "high_res_feats_1")
DECODER_INPUTS = (*ENCODER_OUTPUTS, "point_coords", "point_labels")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
MAX_POINTS = 64
IMAGE_PREDICTOR = ("image_encoder", "sam_prompt_encoder", "sam_mask_decoder")


class ImageEncoderGraph(nn.Module):
    """The image encoder with the decoder's high-resolution projections, as sam2's `set_image` runs them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_embed, (high_res_0, high_res_1) = image_features(self.model, image)
        return image_embed, high_res_0, high_res_1


class PromptDecoderGraph(nn.Module):
    """Prompt encoder + mask decoder for one image and one prompt set (sam2's `_predict`, unbatched)."""

    def __init__(self, model: nn.Module, multimask_output: bool):
        super().__init__()
        self.model = model
        self.multimask_output = multimask_output

    def forward(
        self,
        image_embed: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        sparse, dense = model.sam_prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=None)
        low_res_masks, iou_predictions, _, _ = model.sam_mask_decoder(
            image_embeddings=image_embed,
            image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=self.multimask_output,
            repeat_image=False,
            high_res_features=[high_res_feats_0, high_res_feats_1],
        )
        size = model.image_size
        masks = F.interpolate(low_res_masks, (size, size), mode="bilinear", align_corners=False)
        return masks, iou_predictions, low_res_masks


@dataclass
class OnnxExport:
    """What `export_image_predictor` wrote: the graphs' paths, the metadata stored in them, the layer report."""

    encoder: Path
    decoder: Path
    metadata: dict
    layers: OnnxLayerReport

    @property
    def nbytes(self) -> int:
        return self.encoder.stat().st_size + self.decoder.stat().st_size


def export_ready(
    model: nn.Module, config: OnnxExportConfig, components: tuple[str, ...] | None = IMAGE_PREDICTOR
) -> tuple[nn.Module, OnnxLayerReport]:
    """A CPU fp32 copy of `model` whose `components` (None: all) have their quantized layers swapped for the
    export-ready form (a float model is copied as it is); its forward computes what the fake-quant model
    computes."""
    ready = copy.deepcopy(model).float().cpu().eval()
    report = to_export_layers(ready, config, components) if is_quantized(model) else OnnxLayerReport()
    return ready, report


def example_inputs(image_size: int, points: int = 2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An image and a decoder prompt (a box as two corner points) of the right shapes, for tracing."""
    image = torch.zeros(1, 3, image_size, image_size)
    prompt = {
        "point_coords": torch.tensor([[[0.25, 0.25], [0.75, 0.75]]])[:, :points] * image_size,
        "point_labels": torch.tensor([[2, 3]], dtype=torch.int32)[:, :points],
    }
    return image, prompt


def _features_for_tracing(image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.zeros(1, 256, image_size // 16, image_size // 16),
        torch.zeros(1, 32, image_size // 4, image_size // 4),
        torch.zeros(1, 64, image_size // 8, image_size // 8),
    )


def export_module(
    graph: nn.Module,
    args: tuple,
    path: Path,
    inputs: Sequence[str],
    outputs: Sequence[str],
    dynamic_shapes=None,
) -> None:
    """torch.onnx.export (dynamo, opset 21) of an export-ready module, our custom ops translated, to `path`."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing chatter
        logging.getLogger("torch.onnx").setLevel(logging.WARNING)
        program = torch.onnx.export(
            graph,
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=TRANSLATIONS,
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise MQSAM2Error(f"torch.onnx.export returned no program for {path.name}")
    program.save(str(path))


def write_metadata(path: Path, metadata: dict) -> None:
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {key: json.dumps(value) for key, value in metadata.items()})
    onnx.save(proto, str(path))


def export_image_predictor(
    model: nn.Module, directory: str | Path, config: OnnxExportConfig | None = None
) -> OnnxExport:
    """Write `encoder.onnx` and `decoder.onnx` for a quantized (or float) SAM2 into `directory`."""
    config = config or OnnxExportConfig()
    if not hasattr(model, "image_size") or not hasattr(model, "sam_mask_decoder"):
        raise MQSAM2Error(
            "export_image_predictor needs a SAM2 model (mqsam2.models.build_sam2 or load_export)"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ready, report = export_ready(model, config)
    size = int(ready.image_size)
    image, prompt = example_inputs(size)
    encoder, decoder = directory / ENCODER_FILE, directory / DECODER_FILE
    export_module(ImageEncoderGraph(ready), (image,), encoder, ["image"], ENCODER_OUTPUTS)
    points = torch.export.Dim("points", min=1, max=MAX_POINTS)
    export_module(
        PromptDecoderGraph(ready, config.multimask_output),
        (*_features_for_tracing(size), prompt["point_coords"], prompt["point_labels"]),
        decoder,
        DECODER_INPUTS,
        DECODER_OUTPUTS,
        dynamic_shapes=(None, None, None, {1: points}, {1: points}),
    )
    metadata = finish_export(model, config, report, (encoder, decoder))
    return OnnxExport(encoder, decoder, metadata, report)


def finish_export(
    model: nn.Module, config: OnnxExportConfig, report: OnnxLayerReport, paths: Sequence[Path]
) -> dict:
    """Trim the report to the layers the graphs use and write the metadata (source config, size, bit plan,
    kernels) into every graph; returns the metadata."""
    keep_exported(report, paths)
    metadata = {
        "mqsam2.sam2_config": getattr(model, "mqsam2_config", None),
        "mqsam2.image_size": int(model.image_size),
        "mqsam2.quantized": is_quantized(model),
        "mqsam2.bit_plan": {k: v for k, v in bit_plan(model).items() if k in report.kernels},
        "mqsam2.export_config": asdict(config),
        "mqsam2.kernels": report.kernels,
    }
    for path in paths:
        write_metadata(path, metadata)
    return metadata


def keep_exported(report: OnnxLayerReport, paths: Sequence[Path]) -> None:
    """Drop from the report the swapped layers no graph uses (e.g. the prompt encoder's mask convolutions:
    the decoder takes no mask prompt)."""
    initializers = {
        init.name
        for path in paths
        for init in onnx.load(str(path), load_external_data=False).graph.initializer
    }
    for name in list(report.kernels):
        if not {f"model.{name}.codes", f"model.{name}.packed"} & initializers:
            del report.kernels[name]
            report.fallbacks.pop(name, None)
