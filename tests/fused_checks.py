"""Checks of mqsam2.quant.fused against the eager ops, on any device: on CPU tensors under Triton's interpreter
(tests/test_fused_fake_quant.py runs this file in a fresh process with TRITON_INTERPRET=1, which must be set
before triton is first imported) and on CUDA by that file's GPU test. Not collected by itself."""

from __future__ import annotations

import pytest
import torch

from mqsam2.quant.quantizer import WeightQuantizer, _training_fake_quantize
from mqsam2.quant.soft_rounding import rectified_sigmoid
from mqsam2.reconstruct.rounding import rounding_regularizer


def _randn(shape, seed: int, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _activation(device: torch.device) -> torch.Tensor:
    """Values inside and well outside the 4-bit range of step 0.05 and zero-point 7, plus exact ties."""
    ties = (torch.arange(-10, 10) + 0.5) * 0.05
    return torch.cat([_randn(3000, 0, "cpu") * 0.6, ties]).reshape(-1, 20).to(device).requires_grad_()


def _quant_params(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(0.05, device=device, requires_grad=True), torch.tensor(7.0, device=device)


def _eager(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """The training fake-quant the kernel replaces (4 bits, no dropping)."""
    upper, no_drop = torch.tensor(15.0, device=x.device), torch.tensor(0.0, device=x.device)
    return _training_fake_quantize(x, scale, zero_point, upper, no_drop)


def check_activation(fused, device: torch.device) -> None:
    """Without dropping: the forward follows the eager float32 ops one by one (bit-exact), the input gradient
    too up to the order of two multiplications; the step-size gradient sums 3020 terms in another order
    (float32: relative 1e-5)."""
    x, (scale, zero_point) = _activation(device), _quant_params(device)
    grad = _randn(x.shape, 1, device)
    eager = _eager(x, scale, zero_point)
    eager.backward(grad)
    eager_dx, eager_ds = x.grad.clone(), scale.grad.clone()
    x.grad, scale.grad = None, None
    out = fused.act_fake_quant(x, scale, zero_point, 15, 0.0)
    out.backward(grad)
    assert torch.equal(out, eager)
    torch.testing.assert_close(x.grad, eager_dx, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scale.grad, eager_ds, rtol=1e-5, atol=1e-5)


def check_qdrop(fused, device: torch.device) -> None:
    """With drop rate 0.5: the kernel's draws, read back through `qdrop_mix` with the same torch seed (both
    draw their device seed first), select the float values; the eager fake-quant under that mask is the
    reference, forward and backward. About half the elements keep their float value (3 sigma of a binomial
    over 3020 draws: 0.027)."""
    x, (scale, zero_point) = _activation(device), _quant_params(device)
    grad = _randn(x.shape, 1, device)
    torch.manual_seed(5)
    out = fused.act_fake_quant(x, scale, zero_point, 15, 0.5)
    out.backward(grad)
    torch.manual_seed(5)
    kept = fused.qdrop_mix(torch.zeros_like(x), torch.ones_like(x), 0.5) == 1
    assert abs(kept.float().mean().item() - 0.5) < 0.027
    reference_x = x.detach().clone().requires_grad_()
    reference_scale = scale.detach().clone().requires_grad_()
    reference = torch.where(kept, reference_x, _eager(reference_x, reference_scale, zero_point))
    reference.backward(grad)
    assert torch.equal(out, reference)
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scale.grad, reference_scale.grad, rtol=1e-5, atol=1e-5)


def check_adaround(fused, device: torch.device) -> None:
    """AdaRound's weight (per output channel) and regulariser against the eager WeightQuantizer and
    `rounding_regularizer`, values and gradients to alpha. Triton's sigmoid and exp2/log2 may differ from
    torch's in the last bits: 1e-6 relative on the weight, 1e-5 on the gradients and the sum."""
    weight = _randn((12, 5, 3), 2, device)
    quantizer = WeightQuantizer(3, out_channels=12).to(device)
    quantizer.set_range(weight.flatten(1).min(1).values, weight.flatten(1).max(1).values)
    alpha = quantizer.start_adaround(weight)
    with torch.no_grad():
        alpha.add_(_randn(alpha.shape, 3, device) * 3)  # some h saturate at 0 or 1
    grad = _randn(weight.shape, 4, device)
    (quantizer(weight) * grad).sum().backward()
    eager, eager_grad, alpha.grad = quantizer(weight).detach(), alpha.grad.clone(), None
    out = fused.adaround_weight(weight, alpha, quantizer.scale, quantizer.zero_point, 7)
    (out * grad).sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(alpha.grad, eager_grad, rtol=1e-5, atol=1e-6)
    for beta in (20.0, 2.0):
        alpha.grad = None
        eager_reg = rounding_regularizer(rectified_sigmoid(alpha), beta)
        eager_reg.backward()
        eager_grad, alpha.grad = alpha.grad.clone(), None
        reg = fused.rounding_regularizer(alpha, torch.tensor(beta, device=device))
        reg.backward()
        torch.testing.assert_close(reg, eager_reg, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(alpha.grad, eager_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("check", [check_activation, check_qdrop, check_adaround])
def test_under_the_interpreter(check):
    from mqsam2.quant import fused

    check(fused, torch.device("cpu"))
