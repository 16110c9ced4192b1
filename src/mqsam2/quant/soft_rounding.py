"""AdaRound's rectified sigmoid, the soft rounding that reconstruction learns (eager in `quantizer`, Triton in
`fused`): a module of its own so the two share its constants without importing each other."""

from __future__ import annotations

import torch

GAMMA, ZETA = -0.1, 1.1  # the stretch that lets h reach exactly 0 and 1


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1): reaches exactly 0 and 1 with finite V."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
