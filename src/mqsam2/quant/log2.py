"""PTQ4SAM's Adaptive Granularity Quantization (AGQ) of post-softmax attention: a log2 quantizer whose base
2^(1/tau) is chosen per attention module from tau in {1, 2, 4}, together with its scale s.

    code   q = clamp(round(-tau * log2(p / s)), 0, 2^b - 1)
    value  p_hat = s * 2^(-q / tau)   for q < 2^b - 1,   and 0 for q = 2^b - 1 (underflow)

Our reading of PTQ4SAM (its `AdaptiveGranularityQuantize` and `LogAvgMSEFastObserver`): tau = 1 is the plain
log2 quantizer, larger tau packs the levels 2^(1/tau) apart (finer near the top, shorter reach towards 0);
the scale and tau are the pair with the least Lp error (p = `QuantConfig.mse_p`, 2.4 as in PTQ4SAM) of the
*attention output* `Q(P) @ V` against `P @ V` over the calibration set, not of P itself.

Where we differ from PTQ4SAM's code, on purpose:
- b bits hold 2^b codes: the top code is the exact zero, so 2^b - 1 levels are powers of 2^(1/tau). PTQ4SAM
  clamps to 2^b levels and maps underflow to an extra zero, 2^b + 1 values that b bits cannot store.
- The search is a fixed grid of scales (1/8 octave from 1 down to 2^-12) with losses summed over every
  calibration call, and the joint argmin over (tau, s) is taken at the end; PTQ4SAM runs a bounded scalar
  search per batch and averages the per-batch scales. Summing first makes the result independent of how the
  calibration set is batched and keeps memory flat.
- The search scores an evenly spread subset of each call's outputs: 16 query rows over up to 8 heads or
  windows, 16 value channels. Outputs are independent entries of `P @ V`, so the error of those is exact;
  the many calibration calls make up for the subset.
- Reconstruction keeps (s, tau) fixed and never drops this quantizer (QDrop acts on uniform quantizers).
"""

from __future__ import annotations

import torch

from mqsam2.errors import MQSAM2Error
from mqsam2.quant.quantizer import FakeQuantizer

TAUS: tuple[int, ...] = (1, 2, 4)
SCALE_GRID = torch.exp2(-torch.arange(0, 12 * 8 + 1) / 8.0)  # 1 down to 2^-12, 1/8 octave apart
# per call, the search scores this many heads (or windows), query rows and value channels, spread evenly
_SEARCH_GROUPS, _SEARCH_ROWS, _SEARCH_CHANNELS = 8, 16, 16
_CHUNK_ELEMENTS = 1 << 24  # bound on the candidate tensor evaluated at once


def log2_codes(
    p: torch.Tensor, scale: torch.Tensor | float, tau: torch.Tensor | float, bits: int
) -> torch.Tensor:
    """`clamp(round(-tau * log2(p / s)), 0, 2^b - 1)`; p = 0 lands on the top code (the zero)."""
    top = 2**bits - 1
    return torch.clamp(torch.round(-tau * torch.log2(p / scale)), 0, top)


def log2_dequantize(
    codes: torch.Tensor, scale: torch.Tensor | float, tau: torch.Tensor | float, bits: int
) -> torch.Tensor:
    """`s * 2^(-q / tau)`, and 0 for the top code."""
    top = 2**bits - 1
    return torch.where(codes >= top, torch.zeros_like(codes), scale * torch.exp2(-codes / tau))


def _strided(size: int, count: int, device: torch.device) -> torch.Tensor:
    """`count` indices spread evenly over range(size) (all of them when size <= count)."""
    return torch.arange(0, size, max(1, size // count), device=device)[:count]


class Log2Quantizer(FakeQuantizer):
    """The `attn_quantizer` of PTQ4SAM: post-softmax probabilities on a log2 grid (module docstring).

    `forward(p, values)` takes the values V that the probabilities multiply, because calibration scores each
    (tau, s) by the error it causes in `P @ V`. The state dict holds `scale`, `tau` and `initialized`.
    """

    def __init__(self, bits: int):
        super().__init__(bits)
        self.register_buffer("tau", torch.tensor(float(TAUS[0])))
        self.p = 2.4
        self._losses: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, log2, tau in {TAUS}"

    def attach_observer(self, kind: str, p: float = 2.4, **_unused) -> None:
        """Start the (tau, s) search; the range observer `kind` does not apply to a log2 grid."""
        self.p = p
        self._losses = None

    def make_dynamic(self) -> None:
        raise MQSAM2Error(
            f"{self.name or 'log2 quantizer'}: log2 attention quantizers need calibration; the dynamic "
            "baseline does not support them (use attention_probs: uniform)"
        )

    @torch.no_grad()
    def _observe(self, probs: torch.Tensor, values: torch.Tensor) -> None:
        """Add this call's Lp error of `Q(P) @ V` for every (tau, s) to the running sums."""
        probs = probs.detach().float().flatten(0, -3)
        values = values.detach().float().flatten(0, -3)
        groups = _strided(probs.shape[0], _SEARCH_GROUPS, probs.device)
        rows = _strided(probs.shape[1], max(1, _SEARCH_ROWS // len(groups)), probs.device)
        channels = _strided(values.shape[2], _SEARCH_CHANNELS, values.device)
        probs, values = probs[groups][:, rows], values[groups][:, :, channels]
        reference = probs @ values
        scales = SCALE_GRID.to(probs.device)
        chunk = max(1, _CHUNK_ELEMENTS // probs.numel())
        top = 2**self.bits - 1
        losses = torch.empty(len(TAUS), len(scales), dtype=torch.float64, device=probs.device)
        for t, tau in enumerate(TAUS):
            exponents = -tau * torch.log2(probs)  # -tau * log2(p / s) = exponents + tau * log2(s)
            for start in range(0, len(scales), chunk):
                s = scales[start : start + chunk].view(-1, 1, 1, 1)
                codes = torch.clamp(torch.round(exponents + tau * torch.log2(s)), 0, top)
                approx = torch.where(codes >= top, 0.0, s * torch.exp2(-codes / tau)) @ values
                error = (approx - reference).abs().pow(self.p)
                losses[t, start : start + chunk] = error.flatten(1).sum(1, dtype=torch.float64)
        self._losses = losses if self._losses is None else self._losses + losses

    def finish_observing(self) -> bool:
        self.observing = False
        if self._losses is None:
            return False
        best = int(torch.argmin(self._losses))
        t, k = divmod(best, self._losses.shape[1])
        with torch.no_grad():
            self.tau.fill_(float(TAUS[t]))
            self.scale.fill_(float(SCALE_GRID[k]))
            self.initialized.fill_(True)
        self._known_ready = True
        self._losses = None
        return True

    def codes(self, p: torch.Tensor) -> torch.Tensor:
        self._check_ready()
        return log2_codes(p.float(), self.scale, self.tau, self.bits).to(torch.uint8)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return log2_dequantize(q.float(), self.scale, self.tau, self.bits)

    def forward(self, p: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        if self.observing:
            if values is None:
                raise MQSAM2Error(f"{self.name}: the log2 search needs the values the probabilities multiply")
            self._observe(p, values)
            return p
        if not self.enabled:
            return p
        self._check_ready()
        quantized = log2_dequantize(
            log2_codes(p.detach(), self.scale, self.tau, self.bits), self.scale, self.tau, self.bits
        ).to(p.dtype)
        if p.requires_grad and torch.is_grad_enabled():
            return p + (quantized - p).detach()  # straight-through, as PTQ4SAM's round_ste
        return quantized
