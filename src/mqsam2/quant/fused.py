"""Fused Triton kernels for reconstruction's per-step elementwise work, safe inside CUDA-graph capture.

Eager, each of these is a chain of elementwise passes over a tensor (about ten each way for an activation
fake-quant), and the Hiera blocks of a reconstruction step are bound by that memory traffic. Here each is one
kernel per direction:

- `act_fake_quant`: activation fake-quant with QDrop's random bypass, as `quantizer._training_fake_quantize`;
  backward gives its straight-through input gradient and LSQ step-size gradient (a per-block partial sum,
  then one reduction).
- `qdrop_mix`: QDrop on a unit's input (each element from the float model with probability p).
- `adaround_weight`: AdaRound's weight, `S * (clamp(floor(W / S) + h(alpha) + Z, 0, 2^b - 1) - Z)` per output
  channel, with the rectified sigmoid h and its gradient to alpha.
- `rounding_regularizer`: `sum(1 - |2 h(alpha) - 1|^beta)` and its gradient.

The arithmetic follows the eager functions in `affine.py`, `quantizer.py` and `rounding.py` operation by
operation in float32, with floating-point contraction off, so a float32 forward matches them bit for bit, and
the gradients follow autograd's conventions for their clamps (zero on a scalar bound, half on a tensor one);
inputs of other dtypes are computed in float32 (eager computes bf16 activations in bf16). Random draws come
from a device tensor seed (made by `torch.randint` on the device, which CUDA graphs replay with fresh
values), so no host value is baked into a captured graph, and the backward pass regenerates the forward's
draws instead of storing a mask. Kernels run on CUDA tensors, or on the CPU under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mqsam2.quant.soft_rounding import GAMMA, ZETA

BLOCK = 1024
_LAUNCH = {"enable_fp_fusion": False}  # no fused multiply-adds: the same roundings as the eager ops
ZETA_: tl.constexpr = tl.constexpr(ZETA)
GAMMA_: tl.constexpr = tl.constexpr(GAMMA)


@triton.jit
def _round_half_even(v):
    """torch.round in float32: floor, then ties to the even neighbour (exact for every float32)."""
    f = tl.floor(v)
    d = v - f
    odd = f - 2.0 * tl.floor(f * 0.5)
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))


@triton.jit
def _act_forward(x_ptr, y_ptr, inv_ptr, scale_ptr, zero_ptr, seed_ptr, n, qmax, drop, DROP: tl.constexpr,
                 BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    x = tl.load(x_ptr + offs, mask=live, other=0.0).to(tl.float32)
    scale, zero = tl.load(scale_ptr), tl.load(zero_ptr)
    codes = tl.minimum(tl.maximum(_round_half_even(x * tl.load(inv_ptr)) + zero, 0.0), qmax)
    y = (codes - zero) * scale
    if DROP:
        y = tl.where(tl.rand(tl.load(seed_ptr), offs) < drop, x, y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=live)


@triton.jit
def _act_backward(grad_ptr, x_ptr, dx_ptr, partial_ptr, inv_ptr, scale_ptr, zero_ptr, seed_ptr, n, qmax, drop,
                  DROP: tl.constexpr, NEED_DX: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    x = tl.load(x_ptr + offs, mask=live, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + offs, mask=live, other=0.0).to(tl.float32)
    inv, scale, zero = tl.load(inv_ptr), tl.load(scale_ptr), tl.load(zero_ptr)
    shifted = _round_half_even(x * inv) + zero
    codes = tl.minimum(tl.maximum(shifted, 0.0), qmax)
    # Autograd's clamps, as the eager training path runs them: clamp(min=0) passes where shifted > 0,
    # clamp(max=<tensor>) passes where shifted < qmax and half at shifted == qmax.
    passed = tl.where(shifted < qmax, 1.0, tl.where(shifted == qmax, 0.5, 0.0))
    grad_codes = tl.where(shifted > 0.0, grad * scale * passed, 0.0)
    # y = (codes - Z) * S with codes = clamp(round_ste(x / S) + Z): S reaches y directly and through 1 / S.
    grad_scale = grad * (codes - zero) - grad_codes * x * inv * inv
    dx = grad_codes * inv
    if DROP:
        dropped = tl.rand(tl.load(seed_ptr), offs) < drop
        grad_scale = tl.where(dropped, 0.0, grad_scale)
        dx = tl.where(dropped, grad, dx)
    tl.store(partial_ptr + pid, tl.sum(tl.where(live, grad_scale, 0.0), axis=0))
    if NEED_DX:
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=live)


@triton.jit
def _mix(q_ptr, f_ptr, out_ptr, seed_ptr, n, drop, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    q = tl.load(q_ptr + offs, mask=live)
    f = tl.load(f_ptr + offs, mask=live)
    tl.store(out_ptr + offs, tl.where(tl.rand(tl.load(seed_ptr), offs) < drop, f, q), mask=live)


@triton.jit
def _soft_rounding(alpha):
    """(h(alpha), dh/dalpha) of the rectified sigmoid; the gradient is zero where the clamp is active."""
    sig = tl.sigmoid(alpha)
    stretched = sig * (ZETA_ - GAMMA_) + GAMMA_
    h = tl.minimum(tl.maximum(stretched, 0.0), 1.0)
    inside = (stretched > 0.0) & (stretched < 1.0)  # autograd's clamp passes strictly inside its bounds
    return h, tl.where(inside, (ZETA_ - GAMMA_) * (1.0 - sig) * sig, 0.0)


@triton.jit
def _adaround_forward(w_ptr, alpha_ptr, scale_ptr, zero_ptr, out_ptr, n, inner, qmax, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    channel = offs // inner
    w = tl.load(w_ptr + offs, mask=live, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + channel, mask=live, other=1.0)
    zero = tl.load(zero_ptr + channel, mask=live, other=0.0)
    h, _ = _soft_rounding(tl.load(alpha_ptr + offs, mask=live, other=0.0))
    codes = tl.floor(tl.math.div_rn(w, scale)) + h + zero
    out = (tl.minimum(tl.maximum(codes, 0.0), qmax) - zero) * scale
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _adaround_backward(grad_ptr, w_ptr, alpha_ptr, scale_ptr, zero_ptr, dalpha_ptr, n, inner, qmax,
                       BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    channel = offs // inner
    w = tl.load(w_ptr + offs, mask=live, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + offs, mask=live, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + channel, mask=live, other=1.0)
    zero = tl.load(zero_ptr + channel, mask=live, other=0.0)
    h, dh = _soft_rounding(tl.load(alpha_ptr + offs, mask=live, other=0.0))
    codes = tl.floor(tl.math.div_rn(w, scale)) + h + zero
    inside = (codes > 0.0) & (codes < qmax)
    tl.store(dalpha_ptr + offs, tl.where(inside, grad * scale, 0.0) * dh, mask=live)


@triton.jit
def _regularizer_forward(alpha_ptr, beta_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    h, _ = _soft_rounding(tl.load(alpha_ptr + offs, mask=live, other=0.0))
    term = 1.0 - tl.exp2(tl.load(beta_ptr) * tl.log2(tl.abs(2.0 * h - 1.0)))
    tl.store(partial_ptr + pid, tl.sum(tl.where(live, term, 0.0), axis=0))


@triton.jit
def _regularizer_backward(grad_ptr, alpha_ptr, beta_ptr, dalpha_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    h, dh = _soft_rounding(tl.load(alpha_ptr + offs, mask=live, other=0.0))
    beta = tl.load(beta_ptr)
    t = 2.0 * h - 1.0
    # d/dh (1 - |t|^beta) = -beta |t|^(beta - 1) sign(t) * 2
    slope = -beta * tl.exp2((beta - 1.0) * tl.log2(tl.abs(t))) * tl.where(t < 0.0, -2.0, 2.0)
    tl.store(dalpha_ptr + offs, tl.load(grad_ptr) * slope * dh, mask=live)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def _seed(device: torch.device) -> torch.Tensor:
    """A fresh seed drawn on the device from torch's generator (graph-safe: each replay draws anew)."""
    return torch.randint(0, 2**31 - 1, (), device=device, dtype=torch.int64)


class _ActFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmax: float, drop: float):
        x = x.contiguous()
        inv = 1.0 / scale.detach().float()  # the eager path multiplies by the reciprocal too
        seed = _seed(x.device)
        y = torch.empty_like(x)
        scale_f, zero_f = scale.detach().float(), zero_point.float()
        _act_forward[_grid(x.numel())](
            x, y, inv, scale_f, zero_f, seed, x.numel(), qmax, drop, DROP=drop > 0, BLOCK=BLOCK, **_LAUNCH
        )
        ctx.save_for_backward(x, inv, scale_f, zero_f, seed)
        ctx.qmax, ctx.drop = qmax, drop
        return y

    @staticmethod
    def backward(ctx, grad):
        x, inv, scale_f, zero_f, seed = ctx.saved_tensors
        grad = grad.contiguous()
        need_dx = ctx.needs_input_grad[0]
        dx = torch.empty_like(x) if need_dx else x  # an unused pointer when no gradient is needed
        partial = torch.empty(_grid(x.numel())[0], device=x.device, dtype=torch.float32)
        _act_backward[_grid(x.numel())](
            grad, x, dx, partial, inv, scale_f, zero_f, seed, x.numel(), ctx.qmax, ctx.drop,
            DROP=ctx.drop > 0, NEED_DX=need_dx, BLOCK=BLOCK, **_LAUNCH,
        )  # fmt: skip
        return dx if need_dx else None, partial.sum(), None, None, None


def act_fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int, drop_prob: float
) -> torch.Tensor:
    """Per-tensor fake-quant of `x` (Eq. 1, straight-through round) where each element keeps its float value
    with probability `drop_prob` (QDrop); gradients reach `x` and the LSQ step `scale`."""
    return _ActFakeQuant.apply(x, scale, zero_point, float(qmax), float(drop_prob))


def qdrop_mix(quant: torch.Tensor, float_: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Each element from `float_` with probability `drop_prob`, else from `quant` (no gradient)."""
    quant, float_ = quant.contiguous(), float_.contiguous()
    out = torch.empty_like(quant)
    _mix[_grid(out.numel())](
        quant, float_, out, _seed(out.device), out.numel(), float(drop_prob), BLOCK=BLOCK
    )
    return out


def _per_channel(w: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, int]:
    return params.detach().float().contiguous(), w.numel() // w.shape[0]


class _AdaRoundWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, alpha, scale, zero_point, qmax: float):
        w, alpha = w.detach().contiguous(), alpha.contiguous()
        scale_f, inner = _per_channel(w, scale)
        zero_f, _ = _per_channel(w, zero_point)
        out = torch.empty_like(w)
        _adaround_forward[_grid(w.numel())](
            w, alpha, scale_f, zero_f, out, w.numel(), inner, qmax, BLOCK=BLOCK, **_LAUNCH
        )
        ctx.save_for_backward(w, alpha, scale_f, zero_f)
        ctx.inner, ctx.qmax = inner, qmax
        return out

    @staticmethod
    def backward(ctx, grad):
        w, alpha, scale_f, zero_f = ctx.saved_tensors
        dalpha = torch.empty_like(alpha)
        _adaround_backward[_grid(w.numel())](
            grad.contiguous(), w, alpha, scale_f, zero_f, dalpha, w.numel(), ctx.inner, ctx.qmax,
            BLOCK=BLOCK, **_LAUNCH,
        )  # fmt: skip
        return None, dalpha, None, None, None


def adaround_weight(
    w: torch.Tensor, alpha: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int
) -> torch.Tensor:
    """AdaRound's soft-rounded weight (per output channel); the gradient reaches `alpha` only."""
    return _AdaRoundWeight.apply(w, alpha, scale, zero_point, float(qmax))


class _RoundingRegularizer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, alpha, beta):
        alpha = alpha.contiguous()
        partial = torch.empty(_grid(alpha.numel())[0], device=alpha.device, dtype=torch.float32)
        _regularizer_forward[_grid(alpha.numel())](
            alpha, beta, partial, alpha.numel(), BLOCK=BLOCK, **_LAUNCH
        )
        ctx.save_for_backward(alpha, beta)
        return partial.sum()

    @staticmethod
    def backward(ctx, grad):
        alpha, beta = ctx.saved_tensors
        dalpha = torch.empty_like(alpha)
        _regularizer_backward[_grid(alpha.numel())](
            grad.float().contiguous(), alpha, beta, dalpha, alpha.numel(), BLOCK=BLOCK, **_LAUNCH
        )
        return dalpha, None


def rounding_regularizer(alpha: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """`sum(1 - |2 h(alpha) - 1|^beta)`; `beta` may be a device tensor (a CUDA graph's input)."""
    if not isinstance(beta, torch.Tensor):
        beta = torch.full((), beta, device=alpha.device)
    return _RoundingRegularizer.apply(alpha, beta.float())
