"""Eq. 1 against PyTorch's own fake-quant kernels, the independent truth."""

import pytest
import torch

from mqsam2.errors import MQSAM2Error
from mqsam2.quant import WeightQuantizer, dequantize_affine, fake_quantize, params_from_range, quantize_affine


@pytest.mark.parametrize("bits", range(2, 9))
def test_per_tensor_matches_torch(bits):
    generator = torch.Generator().manual_seed(bits)
    x = torch.randn(4096, generator=generator) * 3 + 0.5
    scale, zero_point = params_from_range(x.min(), x.max(), bits)
    codes = quantize_affine(x, scale, zero_point, bits)
    expected = torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zero_point.item()), 0, 2**bits - 1)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert torch.equal(dequantize_affine(codes, scale, zero_point), expected)
    assert torch.equal(fake_quantize(x, scale, zero_point, bits), expected)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_matches_torch(bits, axis):
    generator = torch.Generator().manual_seed(10 * bits + axis)
    w = torch.randn(24, 40, generator=generator) * torch.rand(24, 1, generator=generator).add(0.1)
    w = w if axis == 0 else w.t().contiguous()
    lo, hi = w.amin(dim=1 - axis), w.amax(dim=1 - axis)
    scale, zero_point = params_from_range(lo, hi, bits)
    expected = torch.fake_quantize_per_channel_affine(
        w, scale, zero_point.to(torch.int32), axis, 0, 2**bits - 1
    )
    codes = quantize_affine(w, scale, zero_point, bits, axis=axis)
    assert torch.equal(dequantize_affine(codes, scale, zero_point, axis=axis), expected)
    assert torch.equal(fake_quantize(w, scale, zero_point, bits, axis=axis), expected)


def test_range_always_contains_zero_and_endpoints_are_exact():
    scale, zero_point = params_from_range(torch.tensor(0.5), torch.tensor(2.0), 4)
    assert zero_point.item() == 0 and scale.item() == pytest.approx(2.0 / 15)
    scale, zero_point = params_from_range(torch.tensor(-3.0), torch.tensor(-1.0), 3)
    assert zero_point.item() == 7 and scale.item() == pytest.approx(3.0 / 7)


def test_straight_through_gradient_inside_range_only():
    x = torch.tensor([-5.0, -0.3, 0.2, 0.9, 5.0], requires_grad=True)
    scale, zero_point = params_from_range(torch.tensor(-1.0), torch.tensor(1.0), 4)
    fake_quantize(x, scale, zero_point, 4).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("bits", [1, 9, 4.0, True])
def test_bits_outside_supported_range_are_rejected(bits):
    with pytest.raises(MQSAM2Error, match="2..8"):
        params_from_range(torch.tensor(-1.0), torch.tensor(1.0), bits)


def test_weight_codes_taken_while_adaround_is_live_are_the_codes_hardening_fixes():
    """An export may read codes before the rounding is hardened: they must be the learned ones. Truth: round to
    nearest of the hardened weight (which `harden` builds so that RTN maps it onto the learned codes)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=g)
    quantizer = WeightQuantizer(4, 6)
    quantizer.set_range(w.amin(1), w.amax(1))
    nearest = quantizer.codes(w)
    alpha = quantizer.start_adaround(w)
    with torch.no_grad():
        alpha.copy_(torch.randn(alpha.shape, generator=g) * 3)
    live = quantizer.codes(w)
    hardened = quantizer.harden(w)
    assert torch.equal(live, quantize_affine(hardened, quantizer.scale, quantizer.zero_point, 4, axis=0))
    assert not torch.equal(live, nearest)
