"""The calibrated-activation integer layers (fp8 and int8 GEMMs) against the fake-quant layer they replace,
on the CPU (PyTorch runs torch._int_mm and torch._scaled_mm there too), and their routing in `deploy`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mqsam2.deploy import DeployConfig, deploy
from mqsam2.deploy.integer import IntegerLinear, integer_kernel
from mqsam2.errors import MQSAM2Error
from mqsam2.quant import QuantLinear, calibration

BF16_UNIT = 2.0**-8


def _layer(
    bits: int, act_bits: int, in_features: int = 64, out_features: int = 48, seed: int = 0
) -> QuantLinear:
    """A calibrated QuantLinear whose rows span every zero-point case (all-positive, all-negative, mixed)."""
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        offsets = torch.tensor([1.0, -1.0, 0.0])[torch.arange(out_features) % 3, None] * 0.2
        layer.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.05 + offsets)
    quant = QuantLinear.from_float(layer, bits, act_bits)
    holder = nn.Sequential(quant)
    with calibration(holder):
        holder(torch.randn(64, in_features, generator=generator) * 2 + 0.5)
    return quant.eval()


@pytest.mark.parametrize(
    ("bits", "act_bits", "kernel"),
    [(2, 2, "fp8"), (3, 3, "fp8"), (4, 4, "fp8"), (4, 8, "int8"), (5, 5, "int8"), (6, 6, "int8"), (7, 7, "int8"),
     (8, 8, "int8"), (8, 4, "int8")],
)  # fmt: skip
@pytest.mark.parametrize("rows", [5, 40])  # fewer rows than torch._int_mm takes are padded
def test_integer_layer_computes_the_fake_quant_layer(bits, act_bits, kernel, rows):
    layer = _layer(bits, act_bits, seed=bits * 10 + act_bits)
    assert integer_kernel(layer) == (kernel, None)
    x = torch.randn(2, rows, 64, generator=torch.Generator().manual_seed(rows)) * 2 + 0.5
    with torch.no_grad():
        want = layer(x)
        got = IntegerLinear(layer, kernel)(x)
    # int8: an exact int32 sum scaled in fp32; fp8: the same sum, returned by _scaled_mm in bf16
    unit = BF16_UNIT if kernel == "fp8" else 1e-6
    torch.testing.assert_close(got, want, rtol=0, atol=unit * float(want.abs().max()))


def test_layers_the_integer_gemms_cannot_take_say_why():
    assert integer_kernel(_layer(4, 4, in_features=40))[0] == "int8"  # K % 16 != 0: not fp8
    kernel, reason = integer_kernel(_layer(6, 6, in_features=36))
    assert kernel is None and "multiples of 8" in reason
    weight_only = QuantLinear.from_float(nn.Linear(64, 48), 4, None)
    assert integer_kernel(weight_only) == (None, "weight-only layer: no calibrated activation step")


def test_deploy_routes_calibrated_layers_to_the_integer_gemms():
    model = nn.Sequential(_layer(4, 4), nn.GELU(), _layer(6, 6, in_features=48, out_features=32, seed=1))
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        want = model(x)
        deploy(model, DeployConfig(activations="calibrated"))
        got = model(x)
    assert model.mqsam2_deploy_report.kernels == {"0": "fp8-static", "2": "int8-static"}
    assert model[0].packed.nbytes == 48 * 64 * 4 // 8  # codes packed at their own width
    assert model[2].packed.nbytes == 32 * 48 * 6 // 8
    torch.testing.assert_close(got, want, rtol=0, atol=4 * BF16_UNIT * float(want.abs().max()))


def test_unknown_activation_mode_is_refused():
    with pytest.raises(MQSAM2Error, match="activations"):
        DeployConfig(activations="static")


@pytest.mark.parametrize(("bits", "kernel", "gemm"), [(4, "fp8", "_scaled_mm"), (8, "int8", "_int_mm")])
def test_a_permuted_input_reaches_the_gemm_row_major(bits, kernel, gemm, monkeypatch):
    """cuBLAS takes the activations row-major and the weights column-major only (on an H100 a column-major
    fp8 operand fails with CUBLAS_STATUS_NOT_SUPPORTED); Hiera's permuted NHWC input of one image reshapes to
    a column-major view, which the layer must not pass on."""
    layer = _layer(bits, bits)
    real = getattr(torch, gemm)
    layouts = []

    def checked(mat1, mat2, *args, **kwargs):
        layouts.append((mat1.is_contiguous(), mat2.t().is_contiguous()))
        return real(mat1, mat2, *args, **kwargs)

    monkeypatch.setattr(torch, gemm, checked)
    nchw = torch.randn(1, 64, 5, 7, generator=torch.Generator().manual_seed(3)) * 2 + 0.5
    x = nchw.permute(0, 2, 3, 1)
    assert not x.reshape(-1, 64).is_contiguous()
    with torch.no_grad():
        got = IntegerLinear(layer, kernel)(x)
        want = layer(x)
    assert layouts == [(True, True)]
    unit = BF16_UNIT if kernel == "fp8" else 1e-6
    torch.testing.assert_close(got, want, rtol=0, atol=unit * float(want.abs().max()))
