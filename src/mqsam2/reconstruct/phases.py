"""What each reconstruction mode learns, phase by phase: read by the driver that runs the phases and by the run
directory that loads their results."""

from __future__ import annotations

from dataclasses import dataclass

from mqsam2.config import ReconstructionConfig


@dataclass(frozen=True)
class Phase:
    name: str
    iters: int
    learn_rounding: bool
    learn_act: bool
    drop_prob: float = 0.0
    act_quant_on: bool = True
    learn_clipping: bool = False


def phases(config: ReconstructionConfig) -> list[Phase]:
    """QDrop learns everything at once; BRECQ weights (activations float) then activation steps; AdaRound
    learns only rounding, layer by layer; LSC learns clipping ranges and the weights (rounding to nearest)."""
    if config.mode == "qdrop":
        return [Phase("qdrop", config.iters, True, True, config.drop_prob)]
    if config.mode == "brecq":
        return [
            Phase("weights", config.iters, True, False, act_quant_on=False),
            Phase("activations", config.act_iters or config.iters, False, True),
        ]
    if config.mode == "adaround":
        return [Phase("rounding", config.iters, True, False)]
    if config.mode == "lsc":
        return [Phase("lsc", config.iters, False, False, learn_clipping=True)]
    return []
