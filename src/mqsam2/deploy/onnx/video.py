"""SAM2's video tracker as five ONNX graphs, for the host-side loop of `mqsam2.deploy.onnx.tracker`:

- `frame_encoder.onnx`: image [1, 3, S, S] -> vision_feats [1, 256, h, w] (top level, h = S / 16),
  vision_pos [1, 256, h, w] (its position encoding), high_res_feats_0 [1, 32, S/4, S/4], high_res_feats_1
  [1, 64, S/8, S/8] (sam2's `forward_image`: the decoder's high-resolution projections applied).
- `decoder_single.onnx`, `decoder_multi.onnx`: pix_feat [1, 256, h, w] (memory-conditioned features, or
  vision_feats + no-memory embedding on a prompt frame), the two high-resolution maps, point_coords [1, P, 2]
  and point_labels [1, P] (model input pixels; P dynamic; a frame without prompt gets one point labelled -1)
  -> low_res_masks [1, 1, S/4, S/4], high_res_masks [1, 1, S, S], obj_ptr [1, 256], object_score_logits
  [1, 1]: sam2's `_forward_sam_heads` with one mask or with the best of three (`_use_multimask` picks).
- `memory_attention.onnx`: curr, curr_pos [hw, 1, 256], memory, memory_pos [M, 1, 64] (the chosen frames'
  memories, temporal encodings added), obj_ptrs [N, 1, 256] and obj_ptr_tpos [N] (each pointer's signed frame
  distance over the largest one) -> pix_feat_with_mem [1, 256, h, w]. M and N are dynamic; the pointers' sine
  encoding, `obj_ptr_tpos_proj` and their split into 64-wide tokens happen in the graph, as sam2 does them.
- `memory_encoder.onnx`: vision_feats, mask_logits [1, 1, S, S], object_score_logits [1, 1] ->
  maskmem_features [1, 64, h, w], maskmem_pos_enc [1, 64, h, w] (sam2's `_encode_new_memory`: sigmoid,
  scale and bias, no-object embedding). A mask sam2 binarises enters as logits of +-1e4, which the sigmoid
  maps to exactly 1 and 0.

`tracker.json` holds the loop's settings and the few float parameters it adds itself (the no-memory
embedding, the temporal encodings of the memories).

sam2's rotary encoding multiplies complex numbers (`torch.polar`, `view_as_complex`), which ONNX has no type
for, and writes the rotated keys back into a slice of k in place; `_real_rotary_forward` computes the
same rotation on (real, imaginary) pairs with the precomputed cos / sin tables, and keeps the object-pointer
tokens (the last keys) unrotated by concatenation.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from sam2.modeling.sam.transformer import RoPEAttention
from sam2.modeling.sam2_utils import get_1d_sine_pe
from torch import nn

from mqsam2.deploy.onnx.export import export_module, export_ready, finish_export
from mqsam2.deploy.onnx.layers import OnnxExportConfig, OnnxLayerReport
from mqsam2.deploy.onnx.layout import (
    DECODER_FILES,
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    FRAME_ENCODER_FILE,
    FRAME_ENCODER_OUTPUTS,
    MEMORY_ATTENTION_FILE,
    MEMORY_ATTENTION_INPUTS,
    MEMORY_ENCODER_FILE,
    MEMORY_ENCODER_INPUTS,
    TRACKER_FILE,
)
from mqsam2.errors import MQSAM2Error
from mqsam2.memory.policies import policy_name
from mqsam2.quant.modules import QuantAttentionMixin, _ExplicitAttention

MAX_MEMORY_FRAMES, MAX_POINTERS, MAX_POINTS = 32, 64, 64
# The loop settings sam2's SAM2Base carries and the host driver follows (tracker.json, "settings").
LOOP_SETTINGS = (
    "image_size",
    "hidden_dim",
    "mem_dim",
    "num_maskmem",
    "max_obj_ptrs_in_encoder",
    "memory_temporal_stride_for_eval",
    "max_cond_frames_in_attn",
    "use_obj_ptrs_in_encoder",
    "only_obj_ptrs_in_the_past_for_eval",
    "use_signed_tpos_enc_to_obj_ptrs",
    "multimask_output_in_sam",
    "multimask_output_for_tracking",
    "multimask_min_pt_num",
    "multimask_max_pt_num",
    "binarize_mask_from_pts_for_mem_enc",
    "fill_hole_area",
    "non_overlap_masks",
)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """sam2's `x * freqs_cis` on consecutive (real, imaginary) pairs of the last dimension."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


def _real_rotary_forward(self: RoPEAttention, q, k, v, num_k_exclude_rope: int = 0) -> torch.Tensor:
    """`RoPEAttention.forward` without complex numbers or in-place writes (same arithmetic)."""
    q = self._separate_heads(self.q_proj(q), self.num_heads)
    k = self._separate_heads(self.k_proj(k), self.num_heads)
    v = self._separate_heads(self.v_proj(v), self.num_heads)
    cos, sin = self.rope_cos, self.rope_sin  # [HW, D / 2]
    q = _rotate(q, cos, sin)
    rotated = k.shape[-2] - num_k_exclude_rope
    repeats = rotated // cos.shape[0] if self.rope_k_repeat else 1
    k_cos = cos[None].expand(repeats, -1, -1).reshape(-1, cos.shape[-1])
    k_sin = sin[None].expand(repeats, -1, -1).reshape(-1, sin.shape[-1])
    k = torch.cat([_rotate(k[:, :, :rotated], k_cos, k_sin), k[:, :, rotated:]], dim=-2)
    if isinstance(self, QuantAttentionMixin):
        with _ExplicitAttention(self):
            out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return self.out_proj(self._recombine_heads(out))


def use_real_rotary(model: nn.Module, feat_size: int) -> int:
    """Give every RoPEAttention of `model` the real-valued forward and its cos / sin tables for a
    feat_size x feat_size map; returns how many there were."""
    count = 0
    for module in model.modules():
        if isinstance(module, RoPEAttention):
            cis = module.compute_cis(end_x=feat_size, end_y=feat_size)
            module.register_buffer("rope_cos", cis.real.float().contiguous(), persistent=False)
            module.register_buffer("rope_sin", cis.imag.float().contiguous(), persistent=False)
            module.forward = types.MethodType(_real_rotary_forward, module)
            count += 1
    return count


class FrameEncoderGraph(nn.Module):
    """sam2's `forward_image` for one frame: the top-level map, its position encoding, the two
    high-resolution maps (what the tracker keeps of a frame)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.forward_image(image)
        fpn, pos = out["backbone_fpn"], out["vision_pos_enc"]
        return fpn[-1], pos[-1], fpn[0], fpn[1]


class VideoDecoderGraph(nn.Module):
    """sam2's `_forward_sam_heads` in video mode: the chosen mask, its object pointer and object score."""

    def __init__(self, model: nn.Module, multimask_output: bool):
        super().__init__()
        self.model = model
        self.multimask_output = multimask_output

    def forward(self, pix_feat, high_res_feats_0, high_res_feats_1, point_coords, point_labels):
        _, _, _, low_res, high_res, obj_ptr, score = self.model._forward_sam_heads(
            backbone_features=pix_feat,
            point_inputs={"point_coords": point_coords, "point_labels": point_labels},
            mask_inputs=None,
            high_res_features=[high_res_feats_0, high_res_feats_1],
            multimask_output=self.multimask_output,
        )
        return low_res, high_res, obj_ptr, score


class MemoryAttentionGraph(nn.Module):
    """sam2's memory attention for one frame; the object pointers enter whole with their frame distances and
    become tokens with their temporal encoding here (the block of `_prepare_memory_conditioned_features`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, curr, curr_pos, memory, memory_pos, obj_ptrs, obj_ptr_tpos) -> torch.Tensor:
        model = self.model
        channels, mem_dim = model.hidden_dim, model.mem_dim
        if model.add_tpos_enc_to_obj_ptrs:
            tpos_dim = channels if model.proj_tpos_enc_in_obj_ptrs else mem_dim
            obj_pos = model.obj_ptr_tpos_proj(get_1d_sine_pe(obj_ptr_tpos, dim=tpos_dim))[:, None]
        else:
            obj_pos = obj_ptrs.new_zeros(obj_ptrs.shape[0], 1, mem_dim)
        if mem_dim < channels:  # a pointer becomes channels / mem_dim tokens
            split = channels // mem_dim
            obj_ptrs = obj_ptrs.reshape(-1, 1, split, mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
            obj_pos = obj_pos.repeat_interleave(split, dim=0)
        out = model.memory_attention(
            curr=curr,
            curr_pos=curr_pos,
            memory=torch.cat([memory, obj_ptrs], dim=0),
            memory_pos=torch.cat([memory_pos, obj_pos], dim=0),
            num_obj_ptr_tokens=obj_ptrs.shape[0],
        )
        size = model.image_size // 16
        return out.permute(1, 2, 0).reshape(1, channels, size, size)


class MemoryEncoderGraph(nn.Module):
    """sam2's `_encode_new_memory` on mask logits (the host passes a binarised mask as +-1e4 logits)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, vision_feats, mask_logits, object_score_logits) -> tuple[torch.Tensor, torch.Tensor]:
        size = vision_feats.shape[-2:]
        features, pos_enc = self.model._encode_new_memory(
            current_vision_feats=[vision_feats.flatten(2).permute(2, 0, 1)],
            feat_sizes=[size],
            pred_masks_high_res=mask_logits,
            object_score_logits=object_score_logits,
            is_mask_from_pts=False,
        )
        return features, pos_enc[0]


def video_example_inputs(model: nn.Module, frames: int = 2, pointers: int = 3) -> dict[str, torch.Tensor]:
    """Inputs of the right shapes for every graph (for tracing, and for tests)."""
    size = int(model.image_size)
    hw, channels, mem_dim = (size // 16) ** 2, model.hidden_dim, model.mem_dim
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return {
        "image": randn(1, 3, size, size),
        "pix_feat": randn(1, channels, size // 16, size // 16),
        "vision_feats": randn(1, channels, size // 16, size // 16),
        "high_res_feats_0": randn(1, channels // 8, size // 4, size // 4),
        "high_res_feats_1": randn(1, channels // 4, size // 8, size // 8),
        "point_coords": torch.tensor([[[0.25, 0.25], [0.75, 0.75]]]) * size,
        "point_labels": torch.tensor([[2, 3]], dtype=torch.int32),
        "curr": randn(hw, 1, channels),
        "curr_pos": randn(hw, 1, channels),
        "memory": randn(frames * hw, 1, mem_dim),
        "memory_pos": randn(frames * hw, 1, mem_dim),
        "obj_ptrs": randn(pointers, 1, channels),
        "obj_ptr_tpos": torch.linspace(-1, 1, pointers),
        "mask_logits": randn(1, 1, size, size) * 10,
        "object_score_logits": torch.tensor([[1.5]]),
    }


@dataclass
class VideoTrackerExport:
    """What `export_video_tracker` wrote: the graphs by role, tracker.json, the metadata, the layer report."""

    graphs: dict[str, Path]
    settings: Path
    metadata: dict
    layers: OnnxLayerReport

    @property
    def nbytes(self) -> int:
        return sum(path.stat().st_size for path in self.graphs.values())


def decoder_role(multimask_output: bool) -> str:
    return "decoder_multi" if multimask_output else "decoder_single"


def _tracker_settings(model: nn.Module) -> dict:
    """tracker.json: the loop settings, the memory policy and its options, the host-side float parameters."""
    if not model.directly_add_no_mem_embed or not model.use_obj_ptrs_in_encoder or model.num_maskmem < 2:
        raise MQSAM2Error(
            "the ONNX tracker follows SAM2.1's loop (directly_add_no_mem_embed, object pointers, memories): "
            "export a model built from a SAM2.1 config"
        )
    options = getattr(model, "memory_options", None)
    return {
        "settings": {name: getattr(model, name) for name in LOOP_SETTINGS},
        "memory_policy": policy_name(model),
        "memory_options": vars(options) if options is not None else {},
        "no_mem_embed": model.no_mem_embed.detach().float().flatten().tolist(),
        "maskmem_tpos_enc": model.maskmem_tpos_enc.detach().float().reshape(model.num_maskmem, -1).tolist(),
    }


def export_video_tracker(
    model: nn.Module, directory: str | Path, config: OnnxExportConfig | None = None
) -> VideoTrackerExport:
    """Write the five graphs and tracker.json of a quantized (or float) SAM2 video predictor into
    `directory`; `mqsam2.deploy.onnx.OnnxVideoTracker` runs them."""
    config = config or OnnxExportConfig()
    settings = _tracker_settings(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ready, report = export_ready(model, config, components=None)
    use_real_rotary(ready, int(ready.image_size) // 16)
    x = video_example_inputs(ready)
    hw = x["curr"].shape[0]
    frames = torch.export.Dim("memory_frames", min=1, max=MAX_MEMORY_FRAMES)
    pointers = torch.export.Dim("pointers", min=1, max=MAX_POINTERS)
    points = torch.export.Dim("points", min=1, max=MAX_POINTS)
    graphs = {
        "frame_encoder": directory / FRAME_ENCODER_FILE,
        **{decoder_role(multimask): directory / file for multimask, file in DECODER_FILES.items()},
        "memory_attention": directory / MEMORY_ATTENTION_FILE,
        "memory_encoder": directory / MEMORY_ENCODER_FILE,
    }
    export_module(
        FrameEncoderGraph(ready), (x["image"],), graphs["frame_encoder"], ["image"], FRAME_ENCODER_OUTPUTS
    )
    for multimask in DECODER_FILES:
        export_module(
            VideoDecoderGraph(ready, multimask),
            tuple(x[k] for k in DECODER_INPUTS),
            graphs[decoder_role(multimask)],
            DECODER_INPUTS,
            DECODER_OUTPUTS,
            dynamic_shapes=(None, None, None, {1: points}, {1: points}),
        )
    export_module(
        MemoryAttentionGraph(ready),
        tuple(x[k] for k in MEMORY_ATTENTION_INPUTS),
        graphs["memory_attention"],
        MEMORY_ATTENTION_INPUTS,
        ["pix_feat_with_mem"],
        dynamic_shapes=(None, None, {0: hw * frames}, {0: hw * frames}, {0: pointers}, {0: pointers}),
    )
    export_module(
        MemoryEncoderGraph(ready),
        tuple(x[k] for k in MEMORY_ENCODER_INPUTS),
        graphs["memory_encoder"],
        MEMORY_ENCODER_INPUTS,
        ["maskmem_features", "maskmem_pos_enc"],
    )
    metadata = finish_export(model, config, report, list(graphs.values()))
    (directory / TRACKER_FILE).write_text(json.dumps(settings) + "\n")
    return VideoTrackerExport(graphs, directory / TRACKER_FILE, metadata, report)
