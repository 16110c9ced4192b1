"""Deployment on real low-bit kernels: the int4 layer against the dequantization formula, the int8 layer's
re-quantization error, byte counts by hand, refusals, and a deployed SAM2 against its weight-only fake-quant
model."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mqsam2.deploy import DeployConfig, Int4WeightOnlyLinear, Int8DynamicLinear, deploy, weight_nbytes
from mqsam2.errors import MQSAM2Error
from mqsam2.memory.predictor import Prompt
from mqsam2.metrics import region_similarity
from mqsam2.models import TensorImagePredictor, build_sam2
from mqsam2.quant import (
    QuantAttentionMixin,
    QuantConfig,
    QuantLinear,
    calibration,
    dequantize_affine,
    quantizable_layers,
    quantize,
    quantize_affine,
)
from tests.conftest import _moving_square_clip

SIZE = 128
BF16_UNIT = 2.0**-8  # one bf16 rounding is at most half of this, relative


def _quant_linear(out_features: int, in_features: int, bits: int, seed: int) -> QuantLinear:
    """A calibrated weight-only QuantLinear whose rows span every zero-point case: all-positive rows (Z = 0),
    all-negative rows (Z = 2^b - 1) and mixed rows."""
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        weight = torch.randn(out_features, in_features, generator=generator) * 0.05
        offsets = torch.tensor([1.0, -1.0, 0.0])[torch.arange(out_features) % 3, None] * 0.2
        layer.weight.copy_(weight + offsets)
        layer.bias.copy_(torch.randn(out_features, generator=generator))
    quant = QuantLinear.from_float(layer, bits, None)
    quant.weight_quantizer.set_range(quant.weight.min(1).values, quant.weight.max(1).values)
    return quant


def _exact_weight(layer: QuantLinear) -> torch.Tensor:
    quantizer = layer.weight_quantizer
    codes = quantize_affine(layer.weight, quantizer.scale, quantizer.zero_point, quantizer.bits, axis=0)
    return dequantize_affine(codes, quantizer.scale, quantizer.zero_point, axis=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 128), (288, 96), (30, 64), (100, 768)])
def test_int4_layer_equals_the_dequantized_linear(bits, out_features, in_features):
    layer = _quant_linear(out_features, in_features, bits, seed=bits * in_features + out_features)
    assert {0, 2**bits - 1} <= set(layer.weight_quantizer.zero_point.tolist())
    weight = _exact_weight(layer)
    int4 = Int4WeightOnlyLinear.from_quantized(layer)
    scale = layer.weight_quantizer.scale[:, None]
    generator = torch.Generator().manual_seed(0)
    for lead in [(), (5,), (2, 3), (2, 3, 4)]:
        x = torch.randn(*lead, in_features, generator=generator)
        expected = F.linear(x, weight, layer.bias)
        # three bf16 roundings (input, weight incl. tinygemm's zero term of up to 8 steps, output)
        bound = BF16_UNIT * (x.abs() @ (weight.abs() + 8 * scale).T + expected.abs())
        got = int4(x)
        assert got.shape == expected.shape and got.dtype == x.dtype
        assert ((got - expected).abs() <= bound).all(), (lead, ((got - expected).abs() / bound).max())
    assert int4(torch.zeros(0, in_features)).shape == (0, out_features)


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
def test_int8_weight_is_within_half_a_symmetric_step_of_the_exact_weight(bits):
    layer = _quant_linear(96, 256, bits, seed=bits)
    weight = _exact_weight(layer)
    int8 = Int8DynamicLinear.from_weight(weight, layer.bias, DeployConfig())
    step = int8.weight.scale.reshape(-1, 1)
    error = (int8.weight.dequantize() - weight).abs()
    assert (error <= 0.5 * step * (1 + 1e-4)).all()  # nearest rounding, up to fp32 noise in w / step
    assert 0.15 < (error / step).mean() < 0.35  # measured 0.20-0.28: no systematic offset
    x = torch.randn(7, 256)
    assert int8(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert int8(x).dtype == torch.bfloat16


def _calibrated(model: nn.Module, config: QuantConfig, *inputs: torch.Tensor) -> nn.Module:
    quantize(model, config)
    with calibration(model), torch.no_grad():
        for x in inputs:
            model(x)
    return model


def test_shapes_the_int4_kernel_cannot_take_fall_back_to_int8_and_are_reported():
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 32))
    _calibrated(model, QuantConfig(bits=4, weight_only=True), torch.randn(3, 48))
    deploy(model)
    report = model.mqsam2_deploy_report
    assert report.kernels == {"0": "int8", "2": "int4"}
    assert list(report.fallbacks) == ["0"] and "in_features 48" in report.fallbacks["0"]
    assert isinstance(model[0], Int8DynamicLinear) and isinstance(model[2], Int4WeightOnlyLinear)
    assert "in_features 48 is not a multiple of 32" in report.summary()


def test_int4_max_bits_zero_sends_every_linear_to_int8():
    model = _calibrated(nn.Sequential(nn.Linear(64, 32)), QuantConfig(bits=3), torch.randn(4, 64))
    deploy(model, DeployConfig(int4_max_bits=0))
    assert model.mqsam2_deploy_report.kernels == {"0": "int8"}
    assert model.mqsam2_deploy_report.calibrated_activations == 1
    with pytest.raises(MQSAM2Error, match="int4_max_bits"):
        DeployConfig(int4_max_bits=5)


def test_weight_nbytes_matches_a_hand_count():
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 32), nn.LayerNorm(32))
    _calibrated(model, QuantConfig(plan={"0": 4, "1": 8}, weight_only=True), torch.randn(5, 128))
    float_bytes = (128 * 64 + 64 + 64 * 32 + 32 + 2 * 32) * 4
    assert weight_nbytes(model) == float_bytes + (64 + 32) * 4 * 2 + 2  # + fp32 scales, zero-points, flags
    deploy(model)
    int4 = 64 * 128 // 2 + 1 * 64 * 2 * 2 + 64 * 4  # codes, one group of bf16 (scale, zero) per row, bias
    int8 = 32 * 64 + 32 * 4 + 32 * 1 + 32 * 4  # int8 codes, fp32 scale and int8 zero per row, fp32 bias
    assert weight_nbytes(model) == int4 + int8 + 2 * 32 * 4


def test_deploy_refuses_what_it_cannot_run(monkeypatch):
    with pytest.raises(MQSAM2Error, match="cannot deploy a float model: quantize and calibrate"):
        deploy(nn.Sequential(nn.Linear(64, 32)))
    model = _calibrated(nn.Sequential(nn.Linear(64, 32)), QuantConfig(bits=4), torch.randn(2, 64))
    layer = model[0]
    layer.weight_quantizer.start_adaround(layer.weight)
    with pytest.raises(MQSAM2Error, match="AdaRound"):
        deploy(model)
    layer.harden_rounding()
    deploy(model)
    with pytest.raises(MQSAM2Error, match="already deployed"):
        deploy(model)
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    model = _calibrated(nn.Sequential(nn.Linear(64, 32)), QuantConfig(bits=8), torch.randn(2, 64))
    with pytest.raises(MQSAM2Error, match="pip install torchao"):
        deploy(model)


@pytest.fixture(scope="module")
def clip():
    frames, masks = _moving_square_clip(frames=3, size=SIZE)
    return frames, {1: Prompt.from_mask(0, masks[0])}


@pytest.fixture(scope="module")
def weight_only_sam2():
    """Random-init SAM2.1-tiny, weight-only, with 2-, 3- and 4-bit (int4 kernel) and 6- and 8-bit (int8) layers:
    weight-only, so the fake-quant model and the deployed one compute the same function up to bf16 and int8
    activation rounding."""
    model = build_sam2("t", image_size=SIZE)
    plan = {name: (2, 3, 4, 6, 8)[i % 5] for i, name in enumerate(quantizable_layers(model))}
    quantize(model, QuantConfig(plan=plan, weight_only=True))
    with calibration(model):  # weight-only: the weight quantizers observe their weights, no data needed
        pass
    return model


def _image_outputs(model, frames):
    predictor = TensorImagePredictor(model)
    predictor.set_image_tensor(frames[1], (SIZE, SIZE))
    embedding = predictor._features["image_embed"].clone()
    _, _, low_res = predictor.predict(box=[[30, 33, 59, 62]], multimask_output=False, return_logits=True)
    masks, _, _ = predictor.predict(box=[[30, 33, 59, 62]], multimask_output=False)
    return embedding, torch.as_tensor(masks).bool(), torch.as_tensor(low_res)


def test_deployed_sam2_agrees_with_its_weight_only_fake_quant_model(weight_only_sam2, clip):
    frames, prompts = clip
    deployed = deploy(copy.deepcopy(weight_only_sam2))
    counts = deployed.mqsam2_deploy_report.counts()
    assert counts == {"int4": 86, "int8": 57, "float": 16}  # 143 Linear layers split 3:2, 16 Conv2d
    assert weight_nbytes(deployed) < weight_nbytes(weight_only_sam2) / 4

    embedding, masks, _ = _image_outputs(weight_only_sam2, frames)
    deployed_embedding, deployed_masks, _ = _image_outputs(deployed, frames)
    relative_error = (deployed_embedding - embedding).norm() / embedding.norm()
    # Measured 0.013 (bf16 activations everywhere, per-token int8 activations in the 6-/8-bit layers); codes
    # packed in the wrong order along K give 1.36 (and mask IoU 0.73).
    assert relative_error < 0.04
    assert masks.any() and region_similarity(deployed_masks, masks).min() > 0.97  # measured 0.996

    video = weight_only_sam2.track_clip(frames, (SIZE, SIZE), prompts)
    deployed_video = deployed.track_clip(frames, (SIZE, SIZE), prompts)
    assert region_similarity(deployed_video[0], video[0]).min() > 0.95  # measured 0.992-0.995


def test_quantized_attention_returns_to_sam2_attention(clip):
    model = build_sam2("t", image_size=SIZE, video=False)
    quantize(model, QuantConfig(bits=8, weight_only=True, quantize_attention=True))
    with calibration(model):
        model.forward_image(clip[0][:1])
    attention = [type(m).__mro__[2] for m in model.modules() if isinstance(m, QuantAttentionMixin)]
    deploy(model)
    assert model.mqsam2_deploy_report.attention_modules == len(attention) > 0
    assert not any(isinstance(m, QuantAttentionMixin) for m in model.modules())
    restored = [type(m) for m in model.modules() if type(m) in set(attention)]
    assert len(restored) == len(attention)
    with torch.inference_mode():
        assert model.forward_image(clip[0][:1])["vision_features"].isfinite().all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 128), (288, 96), (30, 64), (336, 896)])
def test_cuda_int4_packing_computes_what_the_cpu_packing_computes(bits, out_features, in_features):
    layer = _quant_linear(out_features, in_features, bits, seed=bits + in_features)
    weight = _exact_weight(layer)
    cpu = Int4WeightOnlyLinear.from_quantized(layer)
    cuda = Int4WeightOnlyLinear.from_quantized(copy.deepcopy(layer).cuda())
    x = torch.randn(3, 37, in_features)
    expected = F.linear(x, weight, layer.bias)
    bound = BF16_UNIT * (
        x.abs() @ (weight.abs() + 8 * layer.weight_quantizer.scale[:, None]).T + expected.abs()
    )
    got_cuda = cuda(x.cuda()).cpu()
    assert ((got_cuda - expected).abs() <= bound).all()
    assert ((got_cuda - cpu(x)).abs() <= 2 * bound).all()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert cuda(x.cuda()).dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_int8_layer_runs_torchao_int8_and_compiles():
    layer = _quant_linear(336, 896, 6, seed=0).cuda()
    weight = _exact_weight(layer)
    int8 = Int8DynamicLinear.from_weight(weight, layer.bias, DeployConfig())
    x = torch.randn(4, 1024, 896, device="cuda")
    expected = F.linear(x, weight, layer.bias)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager, compiled = int8(x), torch.compile(int8)(x)
    for got in (eager, compiled):
        assert got.dtype == torch.bfloat16
        assert ((got.float() - expected).norm() / expected.norm()) < 0.02  # per-token int8 activations
