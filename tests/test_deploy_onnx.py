"""The ONNX export against the PyTorch fake-quant model it came from (ONNX Runtime as the independent
executor), the integer codes read back from the ONNX initializers, and a whole SAM2 image predictor."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from mqsam2.deploy.fidelity import PromptSet, mask_fidelity, onnx_box_predictor, torch_box_predictor
from mqsam2.deploy.onnx import (
    OnnxExportConfig,
    OnnxImagePredictor,
    export_image_predictor,
    export_ready,
    session,
)
from mqsam2.deploy.onnx.export import IMAGE_PREDICTOR, export_module
from mqsam2.deploy.onnx.layers import code_dtype
from mqsam2.errors import MQSAM2Error
from mqsam2.models import build_sam2, image_features
from mqsam2.quant import QuantConfig, QuantLinear, calibration, quantizable_layers, quantize
from tests.conftest import _moving_square_clip

# fp32 scaling of an exact integer GEMM against a float GEMM of the exactly dequantized operands: a few ulp of
# each output (accumulation order), far below one activation step
RTOL = 1e-5


BITS = (2, 3, 4, 5, 6, 7, 8)


class _Layers(nn.Module):
    """Linear layers at every width side by side, a 24-input one (no power-of-2 block of 16 or more), and
    two strided convolutions; each reads the same input, so one export checks them all."""

    def __init__(self):
        super().__init__()
        self.linear = nn.ModuleList(nn.Linear(96, 40) for _ in BITS)
        self.narrow = nn.Linear(24, 8)
        self.conv = nn.ModuleList(nn.Conv2d(8, 24, 3, padding=1, stride=2) for _ in range(2))

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (
            *(layer(x) for layer in self.linear),
            self.narrow(x[..., :24]),
            *(conv(image) for conv in self.conv),
        )


PLAN = {f"linear.{i}": bits for i, bits in enumerate(BITS)} | {"narrow": 4, "conv.0": 3, "conv.1": 8}


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 10, 96, generator=generator) * 3, torch.randn(1, 8, 12, 12, generator=generator)


def _quantized(
    module: nn.Module, plan: dict[str, int], inputs: tuple, act_bits: int | None = None
) -> nn.Module:
    quantize(module, QuantConfig(plan=plan, act_bits=act_bits, keep_fp=()))
    with calibration(module):
        module(*inputs)
    return module.eval()


def _export(module: nn.Module, inputs: tuple, path, config: OnnxExportConfig):
    """(ONNX Runtime's outputs, the layer report) of the export-ready module."""
    ready, report = export_ready(module, config, components=None)
    names = [f"x{i}" for i in range(len(inputs))]
    with torch.no_grad():
        outputs = [f"y{i}" for i in range(len(ready(*inputs)))]
    export_module(ready, inputs, path, names, outputs)
    feeds = {name: x.numpy() for name, x in zip(names, inputs, strict=True)}
    return [torch.from_numpy(y) for y in session(path, threads=1).run(None, feeds)], report


def _initializers(path) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in onnx.load(str(path)).graph.initializer}


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=RTOL * float(want.abs().max()))


def _nibbles(packed: np.ndarray, shape) -> np.ndarray:
    """MatMulNBits' bytes as their two 4-bit values, low nibble first."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(shape)


@pytest.mark.parametrize("kernel", ["int8", "int4"])
def test_exported_layers_compute_the_fake_quant_layers_and_store_their_codes(tmp_path, kernel):
    model = _quantized(_Layers(), PLAN, _inputs(0))
    inputs = _inputs(1)
    with torch.no_grad():
        want = model(*inputs)
    path = tmp_path / "layers.onnx"
    got, report = _export(model, inputs, path, OnnxExportConfig(low_bit_kernel=kernel))
    for g, w in zip(got, want, strict=True):
        _assert_close(g, w)

    stored = _initializers(path)
    for name, bits in PLAN.items():
        quantizer = model.get_submodule(name).weight_quantizer
        codes = quantizer.codes(model.get_submodule(name).weight).numpy().astype(np.int64)
        zero_point = quantizer.zero_point.numpy().astype(np.int64)
        if name.startswith("conv"):
            assert report.kernels[name] == "qdq-conv"
            np.testing.assert_array_equal(stored[f"{name}.codes"].astype(np.int64), codes)
        elif kernel == "int4" and bits <= 4 and name != "narrow":
            assert report.kernels[name] == "matmulnbits-int4"
            np.testing.assert_array_equal(_nibbles(stored[f"{name}.packed"], codes.shape), codes)
            blocks = stored[f"{name}.packed"].shape[1]
            zero_points = _nibbles(stored[f"{name}.zero_points"], (len(codes), -1))[:, :blocks]
            np.testing.assert_array_equal(zero_points, np.repeat(zero_point[:, None], blocks, axis=1))
        else:
            assert report.kernels[name] == "qdq-int8"
            np.testing.assert_array_equal(stored[f"{name}.codes"].T.astype(np.int64), codes)
            np.testing.assert_array_equal(stored[f"{name}.zero_point"].astype(np.int64), zero_point)
            np.testing.assert_array_equal(stored[f"{name}.scale"], quantizer.scale.numpy())
    if kernel == "int4":
        assert "power-of-2" in report.fallbacks["narrow"]


class _Positive(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 16) for _ in range(3))
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.uniform_(0.5, 1.0)
                layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(layer(x) for layer in self.layers)


def test_signed_codes_stay_exact_at_the_int16_pair_limit(tmp_path):
    """The worst case for x86's saturating uint8 x int8 pair sums: every activation at its top code and every
    weight at its top code (all-positive rows: zero-point 0), so each pair sums to 2 (2^a - 1)(2^b - 1)."""
    widths = [(6, 8), (7, 7), (4, 8)]  # (weight bits, activation bits), each pair sum at most 32,258
    model = _Positive()
    for i, (bits, act_bits) in enumerate(widths):
        assert code_dtype(bits, act_bits) == torch.int8
        model.layers[i] = QuantLinear.from_float(model.layers[i], bits, act_bits)
    with calibration(model):
        model(torch.rand(4, 64))
    inputs = (torch.ones(3, 64),)  # every activation at the calibrated maximum
    with torch.no_grad():
        want = model(*inputs)
    got, _ = _export(model, inputs, tmp_path / "limit.onnx", OnnxExportConfig())
    for g, w in zip(got, want, strict=True):
        _assert_close(g, w)


def test_codes_that_could_saturate_are_stored_unsigned():
    assert code_dtype(7, 8) == torch.uint8  # 2 * 255 * 127 > 32767
    assert code_dtype(8, 8) == torch.uint8  # 8-bit codes do not fit int8
    assert code_dtype(7, None) == torch.uint8  # a weight-only layer is judged against 8-bit activations


def test_bad_export_options_are_refused():
    with pytest.raises(MQSAM2Error, match="low_bit_kernel"):
        OnnxExportConfig(low_bit_kernel="int2")
    with pytest.raises(MQSAM2Error, match="exported image predictor"):
        OnnxImagePredictor("/nonexistent")


SIZE = 128  # the smallest the moving-square clip fits in


def _relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def _box() -> np.ndarray:
    return np.array([[SIZE * 0.2, SIZE * 0.2, SIZE * 0.6, SIZE * 0.6]], np.float32)


@pytest.mark.slow  # two SAM2 graphs through torch.export: about a minute
def test_float_sam2_export_computes_what_pytorch_computes(tmp_path):
    frames, _ = _moving_square_clip(frames=2, size=SIZE)
    model = build_sam2("t", image_size=SIZE, video=False)
    export = export_image_predictor(model, tmp_path)
    assert export.layers.kernels == {}
    predictor = OnnxImagePredictor(tmp_path, threads=1)
    with torch.inference_mode():
        embedding = image_features(model, frames[:1])[0].numpy()
    assert _relative_error(predictor.encode(frames[0])["image_embed"], embedding) < 1e-4  # fp32 reassociation
    prompts = [PromptSet(frame, _box()) for frame in frames]
    assert mask_fidelity(torch_box_predictor(model), onnx_box_predictor(predictor), prompts).iou_min > 0.99


@pytest.mark.slow  # two SAM2 graphs through torch.export: about a minute
def test_quantized_sam2_export_keeps_the_codes_and_follows_the_fake_quant_model(tmp_path):
    """A mixed 2-8-bit plan over the image encoder and decoder at toy size, 2-4-bit layers on MatMulNBits.

    A random-init network with 2- and 3-bit activations is chaotic: a float rounding difference that moves
    one activation across a rounding boundary moves it by a whole step, and the change spreads. The same
    fake-quant model evaluated in float64 instead of float32 is the yardstick for that noise: ONNX Runtime
    reassociates float sums too, and must stay within it (a wrong code, zero-point or scale would not)."""
    frames, _ = _moving_square_clip(frames=3, size=SIZE)
    model = build_sam2("t", image_size=SIZE, video=False)
    layers = [name for name in quantizable_layers(model) if name.split(".")[0] in IMAGE_PREDICTOR]
    quantize(model, QuantConfig(bits=8, plan={name: 2 + i % 7 for i, name in enumerate(layers)}))
    with calibration(model):
        torch_box_predictor(model)(frames[0], _box())
    export = export_image_predictor(model, tmp_path, OnnxExportConfig(low_bit_kernel="int4"))
    counts = export.layers.counts()
    assert counts["matmulnbits-int4"] > 0 and counts["qdq-int8"] > 0 and counts["qdq-conv"] > 0

    stored = _initializers(export.encoder) | _initializers(export.decoder)
    for name, kernel in export.layers.kernels.items():
        layer = model.get_submodule(name)
        codes = layer.weight_quantizer.codes(layer.weight).numpy().astype(np.int64)
        if kernel == "matmulnbits-int4":
            np.testing.assert_array_equal(_nibbles(stored[f"model.{name}.packed"], codes.shape), codes)
        else:
            weights = stored[f"model.{name}.codes"].astype(np.int64)
            np.testing.assert_array_equal(weights.T if kernel == "qdq-int8" else weights, codes)

    with torch.inference_mode():
        embedding = image_features(model, frames[1:2])[0].numpy()
        float64 = image_features(copy.deepcopy(model).double(), frames[1:2].double())[0].float().numpy()
    prompts = [PromptSet(frame, _box()) for frame in frames]
    fake_quant = torch_box_predictor(model)
    floor = _relative_error(float64, embedding)
    for optimize in (False, True):  # the graph as exported, then with ONNX Runtime's integer kernels
        predictor = OnnxImagePredictor(tmp_path, threads=1, optimize=optimize)
        error = _relative_error(predictor.encode(frames[1])["image_embed"], embedding)
        assert error <= 2 * floor + 1e-5  # measured: 0.224 against a float64 floor of 0.219
        fidelity = mask_fidelity(fake_quant, onnx_box_predictor(predictor), prompts)
        assert fidelity.iou_mean >= 0.85  # measured: 0.92-0.93 (2-bit activations on random weights)
