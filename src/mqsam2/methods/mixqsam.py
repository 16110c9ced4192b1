"""Mix-QSAM (Ranjan & Savakis, 2025), the predecessor of Mix-QSAM2: layer importance from the KL divergence of
the output masks when one layer alone is quantized, cross-layer synergy of adjacent layers, and widths from an
integer quadratic program (`mqsam2.kl_importance`, `mqsam2.iqp`); then QDrop block reconstruction.

The paper's text available to us gives the importance and synergy formulas but not the program itself. Our
reading, with one-hot widths b_l over the candidates c_0 < c_1 < ... (b_min = c_0) and shared weight/input
widths as in the paper:

    minimise   sum_l Omega_l * 4^-(b_l - b_min)  +  lambda * sum_l w_l * (b_l - b_(l+1))^2,   w_l = S_hat_l / sum S_hat
    subject to sum_l p_l * b_l   <= B * sum_l p_l       (model size: parameters)
               sum_l m_l * b_l^2 <= B^2 * sum_l m_l     (bit operations: MACs x weight bits x input bits)

- Omega_l is the layer's share of the output KL at the lowest candidate width, and KL is second order in a
  small perturbation, so it falls with the squared quantization step: 4x per bit. The first term is the
  predicted output KL of the allocation (1 when every layer sits at b_min).
- "Highly interdependent layers maintain similar bit-widths": adjacent layers pay for a width step in
  proportion to their normalised synergy, which is largest where their importances are close. Both terms
  sum to 1 over the model; lambda = 0.05 is our choice (the paper gives no weight), small enough that
  heavy-tailed importances still spread the widths (tests/test_mixqsam.py).
- Both budgets equal uniform WbAb's, so the row never costs more than uniform in size or bit operations.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from fractions import Fraction

from torch import nn

from mqsam2.allocation import Allocation, average_bits
from mqsam2.iqp import iqp_objective, solve_iqp
from mqsam2.kl_importance import OutputSensitivity, measure_output_kl
from mqsam2.methods.registry import Method, register
from mqsam2.quant.swap import quantizable_layers

log = logging.getLogger(__name__)
_MAC_RESOLUTION = 10**6  # MACs are rescaled to integers up to this (a 1e-6 relative rounding of a proxy)


def mixqsam_program(
    sensitivity: OutputSensitivity,
    candidates: list[int],
    target_avg: float,
    synergy_weight: float = 0.05,
    epsilon: float = 0.1,
) -> tuple[list[list[float]], list[list[list[float]]], list[tuple[list[list[int]], int]]]:
    """(unary costs, pair costs, budgets) of the program in the module docstring, for `solve_iqp`."""
    importance = sensitivity.importance().tolist()
    synergy = sensitivity.synergy(epsilon)
    weights = (synergy / synergy.sum()).tolist() if len(synergy) else []
    unary = [[omega * 4.0 ** -(c - candidates[0]) for c in candidates] for omega in importance]
    pair = [[[synergy_weight * w * (a - b) ** 2 for b in candidates] for a in candidates] for w in weights]
    target = Fraction(str(float(target_avg)))
    largest = max(sensitivity.macs)
    macs = [max(1, round(m * _MAC_RESOLUTION / largest)) for m in sensitivity.macs]  # CBC-friendly integers
    budgets = [
        (
            [[p * c for c in candidates] for p in sensitivity.params],
            math.floor(target * sum(sensitivity.params)),
        ),
        ([[m * c * c for c in candidates] for m in macs], math.floor(target**2 * sum(macs))),
    ]
    return unary, pair, budgets


@dataclass(frozen=True)
class MixQSAMAllocator:
    """Mix-QSAM's allocation for a recipe: KL importance at the lowest candidate width, then the exact IQP.

    The KL samples are the first `clips` clips of the workload cut to their first `frames` frames, and its
    first `images` images; each costs one pass per reached layer (about 150 for SAM2.1-t), so these bound
    the method's cost. The recipe's own `quant` settings (observers aside) decide which layers may be
    quantized."""

    clips: int = 1
    frames: int = 8
    images: int = 4
    synergy_weight: float = 0.05
    epsilon: float = 0.1

    def samples(self, workload) -> list:
        """One workload per KL sample."""
        return workload.samples(self.clips, self.frames, self.images)

    def sensitivity(self, model: nn.Module, workload, recipe) -> OutputSensitivity:
        """KL_t(l) of every layer the recipe may quantize, at its lowest candidate width."""
        method = recipe.resolved
        config = dataclasses.replace(
            recipe.quant, weight_observer=method.weight_observer, act_observer=method.act_observer
        )
        samples = self.samples(workload)
        bits = recipe.candidate_widths()[0]
        start = time.perf_counter()
        sensitivity = measure_output_kl(
            model,
            [lambda sample=sample: sample.run_full(model) for sample in samples],
            quantizable_layers(model, config.keep_fp),
            bits,
            config,
        )
        log.info(
            "Mix-QSAM: KL of %d layers x %d samples at %d bits in %.0f s",
            len(sensitivity.names),
            len(samples),
            bits,
            time.perf_counter() - start,
        )
        return sensitivity

    def __call__(self, model: nn.Module, workload, recipe) -> Allocation:
        candidates = recipe.candidate_widths()
        sensitivity = self.sensitivity(model, workload, recipe)
        unary, pair, budgets = mixqsam_program(
            sensitivity, candidates, recipe.bits, self.synergy_weight, self.epsilon
        )
        start = time.perf_counter()
        choice = solve_iqp(unary, pair, budgets)
        bits = tuple(candidates[k] for k in choice)
        return Allocation(
            method="iqp",
            target_avg=recipe.bits,
            candidates=tuple(candidates),
            names=sensitivity.names,
            bits=bits,
            objective=iqp_objective(unary, pair, choice),
            average_bits=average_bits(sensitivity.params, bits),
            solve_seconds=time.perf_counter() - start,
            act_bits=bits,
            act_average_bits=average_bits(sensitivity.act_elements, bits),
            error="kl",
            activations="shared",
        )


MIXQSAM = register(
    Method(
        "mixqsam",
        "Avg-b, KL importance + synergy, IQP (size and BOPs budgets), shared W/A widths, QDrop",
        mixed=True,
        weight_observer="mse",
        act_observer="mse",
        reconstruction="qdrop",
        allocator=MixQSAMAllocator(),
    )
)
