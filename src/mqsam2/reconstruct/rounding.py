"""AdaRound's regulariser and its temperature schedule (Nagel et al. 2020, as used by BRECQ and QDrop)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2h - 1|^beta): zero only when every h is 0 or 1, so annealing beta pushes h to a decision."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


@dataclass(frozen=True)
class BetaSchedule:
    """No regulariser for the first `warmup` fraction of steps, then beta decays linearly from start to end."""

    total_steps: int
    start: float = 20.0
    end: float = 2.0
    warmup: float = 0.2

    def __call__(self, step: int) -> float | None:
        warmup_steps = int(self.warmup * self.total_steps)
        if step < warmup_steps:
            return None
        progress = (step - warmup_steps) / max(self.total_steps - warmup_steps, 1)
        return self.end + (self.start - self.end) * max(0.0, 1.0 - progress)


def hardened_fraction(h: torch.Tensor) -> float:
    """Share of rounding variables already at exactly 0 or 1 (the rectified sigmoid saturates)."""
    return ((h == 0) | (h == 1)).float().mean().item()
