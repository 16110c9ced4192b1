"""Eq. 1 of Mix-QSAM2: the asymmetric affine quantizer, its inverse and a straight-through fake-quant.

The arithmetic mirrors PyTorch's own fake-quant kernels (multiply by the reciprocal of the scale, round half
to even, clamp, shift back), so our codes agree bit for bit with `torch.fake_quantize_per_*_affine`.
"""

from __future__ import annotations

import torch

from mqsam2.errors import MQSAM2Error

MIN_BITS, MAX_BITS = 2, 8
_EPS = torch.finfo(torch.float32).eps


def check_bits(bits: int, option: str | None = None) -> int:
    """`bits` if it is a supported width; otherwise an error naming the `option` that gave it."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        where = f"{option}: " if option else ""
        raise MQSAM2Error(
            f"{where}bit-width {bits!r} is not supported: use an integer in {MIN_BITS}..{MAX_BITS}"
        )
    return bits


def qmax(bits: int) -> int:
    return 2 ** check_bits(bits) - 1


def _broadcast(param: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """A per-channel parameter [C] reshaped to broadcast along `axis` of x; per-tensor passes through."""
    if axis is None or param.ndim == 0:
        return param
    shape = [1] * x.ndim
    shape[axis] = -1
    return param.reshape(shape)


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero-point that map [lo, hi] (widened to contain 0) onto 0..2^b-1."""
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    scale = torch.clamp((hi - lo) / qmax(bits), min=_EPS)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax(bits))
    return scale, zero_point


def quantize_affine(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, axis: int | None = None
) -> torch.Tensor:
    """Integer codes `clamp(round(x / S + Z), 0, 2^b - 1)` as uint8."""
    inv_scale = 1.0 / _broadcast(scale.float(), x, axis)
    codes = torch.round(x.float() * inv_scale) + _broadcast(zero_point.float(), x, axis)
    return torch.clamp(codes, 0, qmax(bits)).to(torch.uint8)


def dequantize_affine(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None
) -> torch.Tensor:
    """`(q - Z) * S` in float32."""
    return (q.float() - _broadcast(zero_point.float(), q, axis)) * _broadcast(scale.float(), q, axis)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, axis: int | None = None
) -> torch.Tensor:
    """Quantize-dequantize with a straight-through round: gradients reach x inside the range and the scale
    (the LSQ estimator), so the same function serves calibration, reconstruction and evaluation."""
    return fake_quantize_to(x, scale, zero_point, qmax(bits), axis)


def fake_quantize_to(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    upper: int | torch.Tensor,
    axis: int | None = None,
) -> torch.Tensor:
    """`fake_quantize` with the top code given directly; as a tensor it keeps compiled kernels generic over
    bit-widths."""
    scale_b = _broadcast(scale, x, axis)
    zero_b = _broadcast(zero_point, x, axis)
    # Two clamps: clamp(x, 0, tensor) would read the tensor bound back to the host (a device sync).
    codes = torch.clamp(_round_ste(x * (1.0 / scale_b)) + zero_b, min=0).clamp(max=upper)
    return ((codes - zero_b) * scale_b).to(x.dtype)
