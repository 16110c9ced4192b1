"""Q-SAM2's Learnable Statistical Clipping (LSC), run inside block-wise reconstruction (post-training reading).

Each quantizer of a unit clips to a range set by its input's statistics and two learnable factors,

    [lo, hi] = [mu - a_lo * sigma, mu + a_hi * sigma]     (per output channel for weights, per tensor for inputs)

and quantizes that range affinely (Eq. 1: scale = (hi - lo) / (2^b - 1), integer zero-point). mu and sigma are
running statistics updated with momentum at every training step (the weights themselves are learned too), so
the threshold follows the data smoothly while the factors learn how far out to clip. The factors start where
the calibrated quantizer's range is, so learning starts from the observers' solution. Gradients reach the
factors through the scale (straight-through rounding, as in LSQ); the zero-point is an integer and is rounded.
Q-SAM2 trains this end to end (QAT); here each unit learns it against the float unit's outputs on the
calibration set, and at the end every quantizer becomes an ordinary affine one with the learned range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mqsam2.errors import MQSAM2Error
from mqsam2.quant.affine import fake_quantize, params_from_range, qmax
from mqsam2.quant.quantizer import ActQuantizer, FakeQuantizer

_MIN_STD = 1e-8


@dataclass(frozen=True)
class LSCConfig:
    """Momentum of the running statistics, learning rates of the clipping factors and of the weights (0 keeps
    the weights fixed), and how many cached samples set the inputs' first statistics."""

    momentum: float = 0.9
    lr_clip: float = 1e-3
    lr_weight: float = 1e-5
    init_samples: int = 32

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise MQSAM2Error(f"lsc.momentum {self.momentum} must lie in [0, 1)")
        if self.lr_clip <= 0 or self.lr_weight < 0:
            raise MQSAM2Error("lsc.lr_clip must be positive and lsc.lr_weight non-negative")


def calibrated_range(quantizer: FakeQuantizer) -> tuple[Tensor, Tensor]:
    """The [lo, hi] an affine quantizer represents: codes 0 and 2^b - 1 dequantized."""
    scale, zero_point = quantizer.scale.detach(), quantizer.zero_point
    return -zero_point * scale, (qmax(quantizer.bits) - zero_point) * scale


def _moments(x: Tensor, axis: int | None) -> tuple[Tensor, Tensor]:
    rows = x.detach().float()
    rows = rows.reshape(1, -1) if axis is None else rows.movedim(axis, 0).flatten(1)
    mean, std = rows.mean(dim=1), rows.std(dim=1, correction=0).clamp_min(_MIN_STD)
    return (mean[0], std[0]) if axis is None else (mean, std)


class StatisticalClipQuantizer(nn.Module):
    """Fake-quant over [mu - a_lo sigma, mu + a_hi sigma]; (mu, sigma) are momentum statistics of the input,
    updated while `tracking` and gradients are on, and (a_lo, a_hi) are learned."""

    def __init__(
        self, bits: int, lo: Tensor, hi: Tensor, mean: Tensor, std: Tensor, axis: int | None, momentum: float
    ):
        super().__init__()
        self.bits, self.axis, self.momentum = bits, axis, momentum
        std = std.float().clamp_min(_MIN_STD)
        self.register_buffer("running_mean", mean.float().clone())
        self.register_buffer("running_std", std.clone())
        self.lo_factor = nn.Parameter(((mean - lo) / std).float())
        self.hi_factor = nn.Parameter(((hi - mean) / std).float())
        self.tracking = False

    @classmethod
    def replacing(
        cls, quantizer: FakeQuantizer, mean: Tensor, std: Tensor, momentum: float
    ) -> StatisticalClipQuantizer:
        """Clipping that starts at `quantizer`'s calibrated range, given the input statistics."""
        lo, hi = calibrated_range(quantizer)
        return cls(quantizer.bits, lo, hi, mean, std, quantizer.axis, momentum).to(quantizer.scale.device)

    def bounds(self) -> tuple[Tensor, Tensor]:
        return (
            self.running_mean - self.lo_factor * self.running_std,
            self.running_mean + self.hi_factor * self.running_std,
        )

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """running <- momentum * running + (1 - momentum) * statistics of x."""
        mean, std = _moments(x, self.axis)
        self.running_mean.lerp_(mean, 1 - self.momentum)
        self.running_std.lerp_(std, 1 - self.momentum)

    def forward(self, x: Tensor) -> Tensor:
        if self.tracking and torch.is_grad_enabled():
            self.update(x)
        scale, zero_point = params_from_range(*self.bounds(), self.bits)
        return fake_quantize(x, scale, zero_point, self.bits, self.axis)

    @torch.no_grad()
    def to_affine(self, quantizer: FakeQuantizer) -> FakeQuantizer:
        """`quantizer` (the one this replaced) set to the learned range: the same scale and zero-point, so it
        quantizes exactly as this module does with tracking off."""
        quantizer.set_range(*self.bounds())
        return quantizer


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


class ClippingSession:
    """LSC on one unit for one reconstruction phase: swaps its quantizers for statistical-clip ones, hands the
    optimizer what to learn, and swaps the learned ranges back into ordinary quantizers at the end."""

    def __init__(self, unit, cache, config: LSCConfig):
        self.unit, self.config = unit, config
        self.weights = {name: layer.weight_quantizer for name, layer in unit.layers.items()}
        self.inputs: dict[str, ActQuantizer] = dict(unit.act_quantizers)  # names relative to the unit
        act_stats = self._input_statistics(cache)
        self.weight_clips = {
            name: StatisticalClipQuantizer.replacing(
                q, *_moments(unit.layers[name].weight, 0), config.momentum
            )
            for name, q in self.weights.items()
        }
        self.input_clips = {
            name: StatisticalClipQuantizer.replacing(q, *act_stats[name], config.momentum)
            for name, q in self.inputs.items()
        }
        for name, clip in self.weight_clips.items():
            unit.layers[name].weight_quantizer = clip
        for name, clip in self.input_clips.items():
            _set(unit.module, name, clip)
        for clip in (*self.weight_clips.values(), *self.input_clips.values()):
            clip.tracking = True

    @torch.no_grad()
    def _input_statistics(self, cache) -> dict[str, tuple[Tensor, Tensor]]:
        """Mean and std of each input quantizer's input over the first cached samples (quantized inputs)."""
        sums: dict[str, list] = {name: [0, 0.0, 0.0] for name in self.inputs}

        def collect(name):
            def hook(_module, args):
                x = args[0].detach().double()
                entry = sums[name]
                entry[0] += x.numel()
                entry[1] += x.sum()
                entry[2] += x.pow(2).sum()

            return hook

        handles = [q.register_forward_pre_hook(collect(name)) for name, q in self.inputs.items()]
        device = next(self.unit.module.parameters()).device
        try:
            picked = [i for group in cache.groups for i in group][: self.config.init_samples]
            for index in picked:
                batch = cache.batch([index], device=device).to(device, torch.float32)
                args, kwargs = batch.unflatten(batch.inputs_q)
                self.unit.module(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        stats = {}
        for name, (count, total, squares) in sums.items():
            if not count:
                raise MQSAM2Error(f"unit {self.unit.name}: LSC saw no input for {name} in the cached samples")
            mean = total / count
            stats[name] = (mean.float(), (squares / count - mean**2).clamp_min(0).sqrt().float())
        return stats

    def param_groups(self) -> list[dict]:
        """Optimizer groups: every clipping factor, and the layers' weights unless lr_weight is 0."""
        clips = (*self.weight_clips.values(), *self.input_clips.values())
        factors = [p for clip in clips for p in (clip.lo_factor, clip.hi_factor)]
        groups = [{"params": factors, "lr": self.config.lr_clip, "name": "clipping"}]
        if self.config.lr_weight > 0:
            weights = [layer.weight for layer in self.unit.layers.values()]
            groups.append({"params": weights, "lr": self.config.lr_weight, "name": "weights"})
        return groups

    def finish(self) -> None:
        """Put ordinary affine quantizers back, each holding its learned range."""
        for name, clip in self.weight_clips.items():
            device = clip.running_mean.device
            self.unit.layers[name].weight_quantizer = clip.to_affine(self.weights[name].to(device))
        for name, clip in self.input_clips.items():
            _set(self.unit.module, name, clip.to_affine(self.inputs[name].to(clip.running_mean.device)))
