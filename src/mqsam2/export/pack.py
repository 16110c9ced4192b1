"""Bit-packing of integer codes at their own bit-width, so a 3-bit layer costs 3 bits per weight on disk.

Bit order (little-endian throughout): code i occupies bits [i*b, (i+1)*b) of one bit stream, least significant
bit first, and bit k of the stream is bit (k mod 8) of byte k // 8. Eight consecutive codes therefore fill
exactly b bytes, which is how both directions are vectorised: a group of eight codes is one little-endian
integer of 8*b bits (at most 64). The unused high bits of the last byte are zero.
"""

from __future__ import annotations

import math

import torch

from mqsam2.errors import MQSAM2Error
from mqsam2.quant.affine import check_bits

_GROUP = 8  # codes per group: 8 codes of b bits are b whole bytes


def packed_nbytes(numel: int, bits: int) -> int:
    """ceil(numel * bits / 8): the size of `pack_codes`' output."""
    return math.ceil(numel * check_bits(bits) / 8)


def _shifts(count: int, step: int) -> torch.Tensor:
    return torch.arange(count, dtype=torch.int64) * step


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes in 0..2^bits-1 (any shape, any integer dtype) as a flat uint8 tensor of ceil(numel*bits/8) bytes."""
    check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise MQSAM2Error(f"pack_codes needs integer codes, got {codes.dtype}")
    flat = codes.detach().reshape(-1).to("cpu", torch.int64)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 1 << bits):
        raise MQSAM2Error(
            f"codes outside 0..{(1 << bits) - 1} cannot be packed at {bits} bits "
            f"(found {int(flat.min())}..{int(flat.max())})"
        )
    numel = flat.numel()
    groups = torch.nn.functional.pad(flat, (0, -numel % _GROUP)).reshape(-1, _GROUP)
    words = (groups << _shifts(_GROUP, bits)).sum(dim=1, keepdim=True)  # disjoint bits: sum == bitwise or
    packed = ((words >> _shifts(bits, 8)) & 0xFF).to(torch.uint8).reshape(-1)
    return packed[: packed_nbytes(numel, bits)]


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The first `numel` codes of a `pack_codes` stream, as a flat uint8 tensor."""
    expected = packed_nbytes(numel, bits)
    if packed.dtype != torch.uint8 or packed.ndim != 1 or packed.numel() != expected:
        raise MQSAM2Error(
            f"{numel} codes at {bits} bits take {expected} packed bytes (a 1-D uint8 tensor); "
            f"got {packed.numel()} of {packed.dtype} with shape {list(packed.shape)}"
        )
    flat = packed.to("cpu", torch.int64)
    groups = torch.nn.functional.pad(flat, (0, -expected % bits)).reshape(-1, bits)
    words = (groups << _shifts(bits, 8)).sum(dim=1, keepdim=True)
    codes = (words >> _shifts(_GROUP, bits)) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(-1)[:numel]
