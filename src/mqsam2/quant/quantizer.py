"""Fake-quantizer modules: scale/zero-point state, calibration by observers, AdaRound and QDrop hooks.

Weights are quantized per output channel, activations per tensor, both asymmetric (Eq. 1). The state dict holds
only tensors (scale, zero-point, an `initialized` flag, and AdaRound's `alpha` while reconstruction runs), so a
quantized model saves and loads like any module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from mqsam2.errors import MQSAM2Error
from mqsam2.quant.affine import (
    check_bits,
    dequantize_affine,
    fake_quantize,
    fake_quantize_to,
    params_from_range,
    qmax,
    quantize_affine,
)
from mqsam2.quant.observers import Observer, make_observer
from mqsam2.quant.soft_rounding import GAMMA, ZETA, rectified_sigmoid
from mqsam2.reconstruct.positions import current_rows


class FakeQuantizer(nn.Module):
    """Quantize-dequantize of one tensor; `observer` collects ranges while `observing` is on."""

    def __init__(self, bits: int, channels: int | None = None, axis: int | None = None):
        super().__init__()
        self.bits = check_bits(bits)
        self.axis = axis
        shape = () if channels is None else (channels,)
        self.scale = nn.Parameter(torch.ones(shape), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))
        self.observer: Observer | None = None
        self.observing = False
        self.enabled = True
        self.fused = False  # reconstruction's Triton kernels (mqsam2.quant.fused) on CUDA tensors
        self.name = ""
        # Reading the `initialized` buffer on a GPU is a device sync (and breaks CUDA graph capture):
        # read it once, then trust this until a state dict is loaded.
        self._known_ready = False

    def extra_repr(self) -> str:
        granularity = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        return f"bits={self.bits}, {granularity}"

    def attach_observer(self, kind: str, **kwargs) -> None:
        self.observer = make_observer(kind, axis=self.axis, **kwargs)

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        scale, zero_point = params_from_range(lo, hi, self.bits)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self.initialized.fill_(True)
        self._known_ready = True

    def _load_from_state_dict(self, *args, **kwargs):
        self._known_ready = False
        super()._load_from_state_dict(*args, **kwargs)

    def finish_observing(self) -> bool:
        """Turn the observed statistics into scale/zero-point; False when the tensor was never seen."""
        self.observing = False
        if self.observer is None or self.observer.lo is None:
            return False
        self.set_range(*self.observer.compute_range(self.bits))
        self.observer = None
        return True

    def _check_ready(self) -> None:
        if self._known_ready:
            return
        if not self.initialized:
            raise MQSAM2Error(
                f"quantizer {self.name or '(unnamed)'} was never calibrated: run calibration on data that "
                "exercises this layer (video clips for the memory modules), or load a calibrated state dict"
            )
        self._known_ready = True

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        self._check_ready()
        return quantize_affine(x, self.scale, self.zero_point, self.bits, self.axis)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return dequantize_affine(q, self.scale, self.zero_point, self.axis)


def _training_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    upper: torch.Tensor,
    drop_prob: torch.Tensor,
) -> torch.Tensor:
    """Fake-quant with QDrop's bypass; widths and drop rate are tensors so one compiled kernel serves all."""
    x_q = fake_quantize_to(x, scale, zero_point, upper)
    return torch.where(torch.rand_like(x, dtype=torch.float32) < drop_prob, x, x_q)


# Dynamo compiles one variant of a function per input dtype, rank, layout (size-1 dimensions, strides, views)
# and autograd state, counted per process, and past `recompile_limit` (8 by default) runs it eagerly for good.
# A whole fit feeds the fake-quant a few dozen such variants (Hiera blocks, then memory attention's bf16 and
# float32 operands of ranks 3 and 4 under bf16-mixed), so the default budget ran out in the first
# memory-attention unit and every later unit lost its fused kernels. The budget is raised once, deliberately.
FUSED_RECOMPILE_LIMIT = 64


@functools.cache
def fused_training_fake_quantize() -> Callable[..., torch.Tensor]:
    """`_training_fake_quantize` compiled: on the GPU, reconstruction is memory-bound on activation
    fake-quant (about ten elementwise passes each way), which compiles to one fused kernel per direction.
    Evaluation keeps the eager path, bit-exact with the exported integer codes."""
    compiled = torch.compile(_training_fake_quantize, dynamic=True)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FUSED_RECOMPILE_LIMIT)
    return compiled


class ActQuantizer(FakeQuantizer):
    """Per-tensor activation quantizer with an LSQ-learnable step and QDrop's random bypass.

    Dropping happens only while gradients are enabled and `drop_prob > 0`, so evaluation under
    `torch.no_grad()`/`inference_mode()` can never see it (PTQ4SAM left it on at test time).
    """

    def __init__(self, bits: int):
        super().__init__(bits)
        self.drop_prob = 0.0
        self.dynamic = False

    def make_dynamic(self) -> None:
        """The naive baseline: every call quantizes with its own input's min-max range (nothing to learn)."""
        self.dynamic = True
        self.initialized.fill_(True)
        self._known_ready = True

    def _dynamic(self, x: torch.Tensor) -> torch.Tensor:
        """The input's own range; one range per batch row inside the batched tracker, whose rows are the
        separate calls of sam2's one-object-at-a-time tracking (an input the rows share keeps one range)."""
        rows = current_rows()
        x_ = x.detach()
        if rows is not None and len(rows) > 1 and x.ndim > 1 and x.shape[0] == len(rows):
            flat = x_.flatten(1)
            scale, zero_point = params_from_range(flat.amin(1), flat.amax(1), self.bits)
            return fake_quantize(x, scale, zero_point, self.bits, axis=0)
        scale, zero_point = params_from_range(x_.amin(), x_.amax(), self.bits)
        return fake_quantize(x, scale, zero_point, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observer.update(x)
            return x
        if not self.enabled:
            return x
        if self.dynamic:
            return self._dynamic(x)
        self._check_ready()
        if not torch.is_grad_enabled() and x.dtype == torch.float32:
            # One fused kernel, bit for bit the same arithmetic as fake_quantize (see quant/affine.py).
            return torch.fake_quantize_per_tensor_affine(
                x, self.scale.detach(), self._integer_zero_point(), 0, qmax(self.bits)
            )
        if not torch.is_grad_enabled() or (self.drop_prob == 0 and not x.is_cuda):
            return fake_quantize(x, self.scale, self.zero_point, self.bits)
        if self.fused and x.is_cuda:
            from mqsam2.quant.fused import act_fake_quant

            return act_fake_quant(x, self.scale, self.zero_point, qmax(self.bits), self.drop_prob)
        train = fused_training_fake_quantize() if x.is_cuda else _training_fake_quantize
        return train(x, self.scale, self.zero_point, *self._training_constants(x.device))

    def _integer_zero_point(self) -> torch.Tensor:
        """The zero-point as the int32 tensor PyTorch's fused fake-quant takes, converted once per change."""
        key = (self.zero_point.data_ptr(), self.zero_point._version)
        if getattr(self, "_zero_point_key", None) != key:
            self._zero_point_int = self.zero_point.detach().round().to(torch.int32)
            self._zero_point_key = key
        return self._zero_point_int

    def _training_constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(top code, drop rate) as device tensors, made once rather than copied to the device every step."""
        key = (device, self.bits, self.drop_prob)
        if getattr(self, "_constants_key", None) != key:
            self._constants = (
                torch.tensor(float(qmax(self.bits)), device=device),
                torch.tensor(float(self.drop_prob), device=device),
            )
            self._constants_key = key
        return self._constants


class WeightQuantizer(FakeQuantizer):
    """Per-output-channel weight quantizer; rounds to nearest, or by learned AdaRound offsets h(alpha)."""

    def __init__(self, bits: int, out_channels: int):
        super().__init__(bits, channels=out_channels, axis=0)
        self.alpha: nn.Parameter | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        self._check_ready()
        if self.alpha is None:
            return fake_quantize(w, self.scale, self.zero_point, self.bits, axis=0)
        if self.fused and w.is_cuda:
            from mqsam2.quant.fused import adaround_weight

            return adaround_weight(w, self.alpha, self.scale, self.zero_point, qmax(self.bits))
        scale = self.scale.reshape(-1, *([1] * (w.ndim - 1)))
        zero_point = self.zero_point.reshape_as(scale)
        codes = torch.floor(w.detach() / scale) + rectified_sigmoid(self.alpha) + zero_point
        return ((torch.clamp(codes, 0, qmax(self.bits)) - zero_point) * scale).to(w.dtype)

    def start_adaround(self, w: torch.Tensor) -> nn.Parameter:
        """Learnable rounding initialised so that h(alpha) equals the fractional part of w / S."""
        self._check_ready()
        scale = self.scale.reshape(-1, *([1] * (w.ndim - 1)))
        frac = (w.detach() / scale - torch.floor(w.detach() / scale)).clamp(1e-4, 1 - 1e-4)
        alpha = -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)
        self.alpha = nn.Parameter(alpha.float())
        return self.alpha

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """The integer codes of `w`: round to nearest, or while AdaRound is live its learned rounding made hard
        (what `harden` fixes), so an export taken before hardening still stores the learned codes."""
        if self.alpha is None:
            return super().codes(w)
        self._check_ready()
        scale = self.scale.reshape(-1, *([1] * (w.ndim - 1)))
        up = (self.alpha >= 0).to(w.dtype)
        codes = torch.floor(w.detach() / scale) + up + self.zero_point.reshape_as(scale)
        return torch.clamp(codes, 0, qmax(self.bits)).to(torch.uint8)

    def soft_rounding(self) -> torch.Tensor:
        if self.alpha is None:
            raise MQSAM2Error(f"{self.name}: AdaRound is not active on this layer")
        return rectified_sigmoid(self.alpha)

    @torch.no_grad()
    def harden(self, w: torch.Tensor) -> torch.Tensor:
        """The weight that round-to-nearest maps onto the learned codes: h is fixed to 0/1 for good and the
        module needs no AdaRound state afterwards."""
        if self.alpha is None:
            return w
        scale = self.scale.reshape(-1, *([1] * (w.ndim - 1)))
        codes = self.codes(w).to(w.dtype)
        self.alpha = None
        return ((codes - self.zero_point.reshape_as(scale)) * scale).to(w.dtype)
