"""GPU: the calibrated integer layers on CUDA, eager and compiled, against the fake-quant layer; the quantized
tracker compiled as sam2's vos_optimized predictor against its eager self; and the refusal on CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mqsam2.deploy import DeployConfig, deploy
from mqsam2.deploy.compiled import compile_tracker
from mqsam2.deploy.integer import IntegerLinear, integer_kernel
from mqsam2.errors import MQSAM2Error
from mqsam2.memory.predictor import Prompt
from mqsam2.metrics import region_similarity
from mqsam2.models import build_sam2
from mqsam2.quant import QuantConfig, calibration, quantizable_layers, quantize
from tests.conftest import _moving_square_clip
from tests.test_deploy_integer import BF16_UNIT, _layer

SIZE = 256

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_compile_tracker_refuses_an_image_model():
    with pytest.raises(MQSAM2Error, match="video predictor"):
        compile_tracker(build_sam2("t", image_size=128, video=False))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("bits", "act_bits"), [(4, 4), (3, 3), (6, 6), (8, 8)])
def test_cuda_integer_layer_eager_and_compiled_compute_the_fake_quant_layer(bits, act_bits):
    layer = _layer(bits, act_bits, in_features=256, out_features=128, seed=bits).cuda()
    kernel, _ = integer_kernel(layer)
    integer = IntegerLinear(layer, kernel)
    x = torch.randn(2, 300, 256, device="cuda") * 2 + 0.5
    with torch.no_grad():
        want = layer(x)
        eager = integer(x)
        compiled = torch.compile(integer, fullgraph=True)(x)
    bound = (BF16_UNIT if kernel == "fp8" else 1e-5) * float(want.abs().max())
    torch.testing.assert_close(eager, want, rtol=0, atol=bound)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=bound)


def _masks(model, frames, prompt) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model.track_clip(frames, (SIZE, SIZE), {1: prompt})[0]


@pytest.mark.gpu
@cuda
def test_compiled_quantized_tracker_equals_its_eager_version():
    """A mixed 4-8-bit W/A plan on the calibrated integer GEMMs, the whole tracker compiled (vos_optimized's
    recipe): the masks of a clip equal the eager deployed tracker's (bf16 sums reassociate, nothing else)."""
    frames, masks = _moving_square_clip(frames=8, size=SIZE)
    model = build_sam2("t", image_size=SIZE, device="cuda")
    plan = {name: 4 + i % 5 for i, name in enumerate(quantizable_layers(model))}
    quantize(model, QuantConfig(plan=plan))
    prompt = Prompt.from_mask(0, masks[0])
    with calibration(model):
        model.track_clip(frames, (SIZE, SIZE), {1: prompt})
    deploy(model, DeployConfig(activations="calibrated"))
    counts = model.mqsam2_deploy_report.counts()
    assert counts.get("fp8-static", 0) > 0 and counts.get("int8-static", 0) > 0
    eager = _masks(model, frames, prompt)
    compiled = _masks(compile_tracker(copy.deepcopy(model), mode="default"), frames, prompt)
    assert float(region_similarity(compiled, eager).min()) >= 0.99


@pytest.mark.gpu
@cuda
def test_compiled_float_tracker_equals_stock_sam2():
    """The recipe itself, on a float model: compiled masks equal the eager ones."""
    frames, masks = _moving_square_clip(frames=6, size=SIZE)
    model = build_sam2("t", image_size=SIZE, device="cuda")
    prompt = Prompt.from_mask(0, masks[0])
    eager = _masks(model, frames, prompt)
    compiled = _masks(compile_tracker(copy.deepcopy(model), mode="default"), frames, prompt)
    assert float(region_similarity(compiled, eager).min()) >= 0.99


def test_layers_kept_out_of_the_integer_gemms_are_reported():
    model = nn.Sequential(_layer(6, 6, in_features=36, out_features=16))
    deploy(model, DeployConfig(activations="calibrated"))
    report = model.mqsam2_deploy_report
    assert report.kernels == {"0": "int8"}
    assert "multiples of 8" in report.fallbacks["0"]
