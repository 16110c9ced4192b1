"""Range observers that initialise quantizers: MinMax, Percentile and MSE/OMSE (Lp error search).

An observer sees a tensor one or more times (weights once, activations once per calibration batch) and then
proposes a clipping range [lo, hi] per tensor or per channel. Exact minima and maxima are always tracked;
Percentile and MSE work on a uniform random sample of bounded size, so calibration memory stays flat however
many batches stream through.
"""

from __future__ import annotations

import torch

from mqsam2.errors import MQSAM2Error
from mqsam2.quant.affine import fake_quantize, params_from_range


class Observer:
    """Collects per-row statistics of x viewed as [C, N] (C = 1 per tensor, C = channels along `axis`)."""

    def __init__(self, axis: int | None = None, sample_size: int | None = 1 << 20, seed: int = 0):
        self.axis = axis
        self.sample_size = sample_size
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        self._generator: torch.Generator | None = None
        self._seed = seed

    @property
    def needs_sample(self) -> bool:
        return True

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float()
        if self.axis is None:
            return x.reshape(1, -1)
        return x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)

    def update(self, x: torch.Tensor) -> None:
        rows = self._rows(x)
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if self.needs_sample:
            self._add_to_sample(rows)

    def _add_to_sample(self, rows: torch.Tensor) -> None:
        """Bottom-k sampling: every value gets a uniform key, the smallest keys survive, so the sample is a
        uniform draw from everything seen, independent of batch order and size."""
        if self.sample_size is None:
            self._values = rows if self._values is None else torch.cat([self._values, rows], dim=1)
            return
        if self._generator is None or self._generator.device != rows.device:
            self._generator = torch.Generator(device=rows.device).manual_seed(self._seed)
        keys = torch.rand(rows.shape, generator=self._generator, device=rows.device)
        if self._values is not None:
            rows = torch.cat([self._values, rows], dim=1)
            keys = torch.cat([self._keys, keys], dim=1)
        per_row = max(self.sample_size // rows.shape[0], 1)
        if rows.shape[1] > per_row:
            keys, index = torch.topk(keys, per_row, dim=1, largest=False)
            rows = torch.gather(rows, 1, index)
        self._values, self._keys = rows, keys

    def compute_range(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) per row; shape [] per tensor, [C] per channel."""
        if self.lo is None:
            raise MQSAM2Error("observer saw no data: run the calibration pass before computing ranges")
        lo, hi = self._range(bits)
        return (lo[0], hi[0]) if self.axis is None else (lo, hi)

    def _range(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """The absolute range seen: never clips, so outliers stretch the grid."""

    @property
    def needs_sample(self) -> bool:
        return False

    def _range(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo, self.hi


class PercentileObserver(Observer):
    """Clips to the [100 - p, p] percentiles, trading clipping error on outliers for a finer grid."""

    def __init__(self, percentile: float = 99.99, **kwargs):
        super().__init__(**kwargs)
        if not 50.0 < percentile <= 100.0:
            raise MQSAM2Error(f"percentile {percentile} must lie in (50, 100]")
        self.percentile = percentile

    def _range(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0], device=self._values.device)
        lo, hi = torch.quantile(self._values, q, dim=1)
        return lo, hi


class MSEObserver(Observer):
    """OMSE: shrink the min/max range over `steps` candidates and keep the one with the least Lp error."""

    def __init__(self, p: float = 2.4, steps: int = 100, **kwargs):
        super().__init__(**kwargs)
        self.p = p
        self.steps = steps

    def _range(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All candidates at once, in chunks of about 2^22 elements (one kernel sequence per chunk instead of
        per candidate: a calibration has hundreds of quantizers); ties keep the widest range, as a loop from
        the full range down would."""
        values = self._values  # [C, N]
        shrinks = torch.linspace(1.0, 1.0 / self.steps, self.steps, device=values.device)
        chunk = max(1, (1 << 22) // max(values.numel(), 1))
        errors = []
        for start in range(0, self.steps, chunk):
            shrink = shrinks[start : start + chunk, None]  # [k, 1]
            scale, zero_point = params_from_range(self.lo[None] * shrink, self.hi[None] * shrink, bits)
            approx = fake_quantize(values[None], scale[..., None], zero_point[..., None], bits)
            errors.append((approx - values[None]).abs().pow(self.p).mean(dim=2))  # [k, C]
        best = torch.cat(errors).argmin(dim=0)  # the first of equal errors
        shrink = shrinks[best]
        return self.lo * shrink, self.hi * shrink


OBSERVERS = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "omse": MSEObserver,
}


def make_observer(
    name: str, axis: int | None = None, percentile: float = 99.99, p: float = 2.4, **kwargs
) -> Observer:
    try:
        cls = OBSERVERS[name.lower()]
    except KeyError:
        raise MQSAM2Error(f"unknown observer {name!r}: use one of {', '.join(OBSERVERS)}") from None
    if cls is PercentileObserver:
        kwargs["percentile"] = percentile
    elif cls is MSEObserver:
        kwargs["p"] = p
    return cls(axis=axis, **kwargs)
