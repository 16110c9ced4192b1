"""Bit allocation of Mix-QSAM2 (Eq. 6): a bit-width per layer that minimises the importance-weighted error.

    minimise  sum_l S_l * E(b_l)   subject to   sum_l b_l * p_l <= B_avg * sum_l p_l,   b_l in B

`solve_ilp` solves it exactly (binary variables per layer and candidate step, PuLP's bundled CBC);
`solve_greedy` is the paper's heuristic as method.md §4 reads it, kept as the baseline that shows what
exactness buys; `solve_uniform` gives every layer the target. All three share one signature and one
validation, and return bits in layer order.
"""

import itertools
import json
import math
import numbers
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pulp

from mqsam2.errors import MQSAM2Error
from mqsam2.files import write_text
from mqsam2.importance import LayerImportance
from mqsam2.quant.affine import MAX_BITS, MIN_BITS

ErrorModel = Callable[[int], float]

ERROR_MODELS: dict[str, ErrorModel] = {
    "pow2": lambda bits: 2.0**-bits,  # the quantization step of a b-bit grid: the paper's example
    "pow4": lambda bits: 4.0**-bits,  # the squared step: quantization noise power (MSE)
}

FAMILIES = (
    "image_encoder.trunk",
    "image_encoder.neck",
    "memory_attention",
    "memory_encoder",
    "sam_prompt_encoder",
    "sam_mask_decoder",
)
OTHER_FAMILY = "other heads"

# CBC ignores objective improvements below an absolute increment (1e-5 by default); the objective is
# scaled so that its largest coefficient is this big, which puts that increment far below any that matters.
_COST_SCALE = 1e6


# PuLP 3.3 deprecates its PULP_CBC_CMD wrapper but still ships the CBC binary (pinned): run it via COIN_CMD.
_CBC = pulp.COIN_CMD(path=pulp.PULP_CBC_CMD.pulp_cbc_path, msg=False, gapRel=0.0, gapAbs=0.0)


class AllocationError(MQSAM2Error, ValueError):
    """Bad input to the allocation, reported in one line and never repaired."""


class SolverError(MQSAM2Error, RuntimeError):
    """The ILP solver failed or did not prove an optimum; there is deliberately no fallback to the greedy."""


@dataclass(frozen=True)
class _Problem:
    """Validated Eq. 6 instance: candidates ascending, the budget in whole bits."""

    scores: list[float]
    params: list[int]
    candidates: list[int]
    budget: int
    error: ErrorModel


def error_model(error: str | ErrorModel | None) -> ErrorModel:
    """The callable E(b) for a config value: a name in ERROR_MODELS, a callable, or None for "pow2"."""
    if error is None:
        return ERROR_MODELS["pow2"]
    if callable(error):
        return error
    if error not in ERROR_MODELS:
        raise AllocationError(f"unknown error model {error!r}; expected one of {', '.join(ERROR_MODELS)}")
    return ERROR_MODELS[error]


def default_candidates(target_avg: float) -> list[int]:
    """A mixed method's widths when none are given: one bit either side of the target ({3, 4, 5} for Avg-4)."""
    centre = round(target_avg)
    return [bits for bits in (centre - 1, centre, centre + 1) if MIN_BITS <= bits <= MAX_BITS]


def check_budget(
    candidates: Sequence[int], target_avg: float, error: str | ErrorModel | None = None, method: str = "ilp"
) -> list[int]:
    """The checks of Eq. 6 that need no layers (so a config is refused before any work): candidates are
    distinct positive integers, the target lies within them (the uniform plan: is one of them) and the error
    model falls as bits grow. Returns the candidates in ascending order."""
    if not candidates:
        raise AllocationError("no candidate bit-widths: give allocation.candidates, e.g. [3, 4, 5]")
    if len(set(candidates)) != len(candidates):
        raise AllocationError(f"duplicate candidate bit-widths in {list(candidates)}")
    if not all(isinstance(bits, numbers.Integral) and bits > 0 for bits in candidates):
        raise AllocationError(f"candidate bit-widths must be positive integers, got {list(candidates)}")
    ascending = sorted(int(bits) for bits in candidates)
    if not ascending[0] <= target_avg <= ascending[-1]:
        raise AllocationError(
            f"target_avg={target_avg} is outside the feasible range [{ascending[0]}, {ascending[-1]}] "
            f"of candidates {ascending}: change allocation.target_avg or allocation.candidates"
        )
    if method == "uniform" and target_avg not in ascending:
        raise AllocationError(
            f"uniform allocation needs target_avg={target_avg} among candidates {ascending}"
        )
    model = error_model(error)
    errors = [model(bits) for bits in ascending]
    if not all(math.isfinite(e) and e >= 0 for e in errors) or any(
        later >= earlier for earlier, later in itertools.pairwise(errors)
    ):
        raise AllocationError(f"the error model must be finite, >= 0 and fall as bits grow; got {errors}")
    return ascending


def _problem(
    scores: Sequence[float],
    params: Sequence[int],
    candidates: Sequence[int],
    target_avg: float,
    error: ErrorModel | None,
) -> _Problem:
    if not scores:
        raise AllocationError("no layers to allocate")
    if len(scores) != len(params):
        raise AllocationError(f"{len(scores)} scores but {len(params)} parameter counts")
    for layer, score in enumerate(scores):
        if not (math.isfinite(score) and score >= 0):
            raise AllocationError(f"score of layer {layer} is {score}; scores must be finite and >= 0")
    for layer, count in enumerate(params):
        if not (isinstance(count, numbers.Integral) and count > 0):
            raise AllocationError(
                f"parameter count of layer {layer} is {count}; counts must be positive integers"
            )
    ascending = check_budget(candidates, target_avg, error)
    error = error_model(error)
    params = [int(count) for count in params]
    budget = math.floor(Fraction(str(float(target_avg))) * sum(params))
    return _Problem([float(s) for s in scores], params, ascending, budget, error)


def objective(scores: Sequence[float], bits: Sequence[int], error: ErrorModel | None = None) -> float:
    """Eq. 6's objective sum_l S_l * E(b_l)."""
    error = error_model(error)
    return math.fsum(score * error(b) for score, b in zip(scores, bits, strict=True))


def average_bits(params: Sequence[int], bits: Sequence[int]) -> float:
    """The parameter-weighted average bit-width that Eq. 6 bounds."""
    return sum(p * b for p, b in zip(params, bits, strict=True)) / sum(params)


def solve_ilp(
    scores: Sequence[float],
    params: Sequence[int],
    candidates: Sequence[int],
    target_avg: float,
    error: ErrorModel | None = None,
) -> list[int]:
    """Exact solution of Eq. 6, solved by CBC to a proven optimum.

    Binary `step[l][k]` is 1 when layer l gets more bits than candidate k; steps are taken in order
    (`step[l][k] >= step[l][k+1]`) and the layer's bits are the lowest candidate plus the steps taken. This is
    the one-hot model (x_lk = step[l][k-1] - step[l][k]) in other coordinates, with the same LP relaxation,
    but branching on a step splits a layer's candidates into a low and a high half instead of excluding one,
    and CBC proves optimality with far fewer nodes (SAM2.1-L: a fraction of a second instead of half a
    minute; docs/benchmarks.md).
    """
    problem = _problem(scores, params, candidates, target_avg, error)
    costs = [[score * problem.error(bits) for bits in problem.candidates] for score in problem.scores]
    gains = _gains(costs)
    return _solve_steps(
        gains, problem.candidates, [(problem.params, problem.budget)], _exchange_order(problem, gains)
    )


def solve_table_ilp(
    costs: Sequence[Sequence[float]],
    candidates: Sequence[int],
    budgets: Sequence[tuple[Sequence[int], float]],
) -> list[int]:
    """Eq. 6 with a cost per (layer, candidate) instead of `S_l * E(b)`, and any number of budgets.

    `costs[l][k]` is layer l's contribution at `candidates[k]` (for example its importance times its measured
    output error at that width); each budget `(weights, target_avg)` bounds the `weights`-weighted average
    width (parameters for weights, quantized activation elements for activations). A cost that rises with
    the width is flattened to the lowest cost at or below that width, since spending bits never has to hurt.
    """
    ascending = sorted(range(len(candidates)), key=lambda k: candidates[k])
    bits = [int(candidates[k]) for k in ascending]
    if not costs:
        raise AllocationError("no layers to allocate")
    monotone = []
    for layer, row in enumerate(costs):
        if len(row) != len(bits) or not all(math.isfinite(c) and c >= 0 for c in row):
            raise AllocationError(
                f"layer {layer} needs one finite cost >= 0 per candidate {bits}, got {list(row)}"
            )
        ordered = [float(row[k]) for k in ascending]
        monotone.append([min(ordered[: k + 1]) for k in range(len(ordered))])
    limits = []
    for weights, target_avg in budgets:
        checked = _problem([0.0] * len(costs), weights, bits, target_avg, None)
        limits.append((checked.params, checked.budget))
    return _solve_steps(_gains(monotone), bits, limits, [])


def _gains(costs: Sequence[Sequence[float]]) -> list[list[float]]:
    """What each step up the (ascending) candidates saves, per layer."""
    return [[low - high for low, high in itertools.pairwise(row)] for row in costs]


def _solve_steps(
    gains: list[list[float]],
    bits: list[int],
    budgets: Sequence[tuple[list[int], int]],
    order_pairs: list[tuple[tuple[int, int], tuple[int, int]]],
) -> list[int]:
    """The step model shared by both ILPs: maximise the gains of the steps taken within every budget
    `(weights, total)`: `sum_l weights_l * bits_l <= total`."""
    largest = max((gain for row in gains for gain in row), default=0.0)
    scale = _COST_SCALE / largest if largest > 0 else 1.0
    model = pulp.LpProblem("bit_allocation", pulp.LpMaximize)
    steps = [
        [model.add_variable(f"layer{layer}_above{low}", cat=pulp.LpBinary) for low in bits[:-1]]
        for layer in range(len(gains))
    ]
    model += pulp.LpAffineExpression(
        (step, scale * gain)
        for row, gain_row in zip(steps, gains, strict=True)
        for step, gain in zip(row, gain_row, strict=True)
    )
    for row in steps:
        for earlier, later in itertools.pairwise(row):
            model += earlier >= later
    for weights, total in budgets:
        model += pulp.LpAffineExpression(
            (step, (high - low) * count)
            for row, count in zip(steps, weights, strict=True)
            for step, (low, high) in zip(row, itertools.pairwise(bits), strict=True)
        ) <= total - bits[0] * sum(weights)
    for (layer_a, step_a), (layer_b, step_b) in order_pairs:
        model += steps[layer_a][step_a] >= steps[layer_b][step_b]
    try:
        model.solve(_CBC)
    except pulp.PulpSolverError as failure:
        raise SolverError(f"CBC failed: {failure}") from failure
    if model.sol_status != pulp.LpSolutionOptimal:
        raise SolverError(
            f"CBC did not prove an optimum: status {pulp.LpStatus[model.status]}, "
            f"solution {pulp.LpSolution[model.sol_status]}"
        )
    solution = [bits[sum(round(step.value()) for step in row)] for row in steps]
    for weights, total in budgets:
        if sum(b * w for b, w in zip(solution, weights, strict=True)) > total:
            raise SolverError("CBC returned an assignment over the bit budget")
    return solution


def _exchange_order(
    problem: _Problem, gains: list[list[float]]
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Pairs (a, b) of (layer, step) with `step a >= step b` in some optimal solution: symmetry breaking.

    Holds when the candidates are evenly spaced and E is convex on them (each layer's gains fall step by
    step): among steps of equal bit cost (layers of equal p_l), ordered by gain, if b is taken and a is not,
    taking the first untaken step of a's layer instead of the last taken step of b's layer keeps the budget
    and loses no error. Without these pairs, the many layers of equal size make CBC enumerate equivalent
    near-optima (SAM2.1-L at 6 bits with candidates 2..8: seconds instead of a fraction of one).
    """
    spacings = {high - low for low, high in itertools.pairwise(problem.candidates)}
    decrements = [
        problem.error(low) - problem.error(high) for low, high in itertools.pairwise(problem.candidates)
    ]
    if len(spacings) > 1 or any(later > earlier for earlier, later in itertools.pairwise(decrements)):
        return []
    by_cost: dict[int, list[tuple[float, int, int]]] = defaultdict(list)
    for layer, row in enumerate(gains):
        for step, gain in enumerate(row):
            by_cost[problem.params[layer]].append((-gain, layer, step))
    return [
        ((layer_a, step_a), (layer_b, step_b))
        for same_cost in by_cost.values()
        for (_, layer_a, step_a), (_, layer_b, step_b) in itertools.pairwise(sorted(same_cost))
    ]


def solve_greedy(
    scores: Sequence[float],
    params: Sequence[int],
    candidates: Sequence[int],
    target_avg: float,
    error: ErrorModel | None = None,
) -> list[int]:
    """The paper's heuristic (method.md §4): rank-based start, cheapest downgrades, then largest upgrades.

    Start: layers sorted by importance are split into |B| equal groups, the most important one at the highest
    candidate. Over budget: downgrade by one candidate step the layer that loses the least importance-weighted
    error per freed bit, `S_l * (E(lower) - E(b)) / ((b - lower) * p_l)`. Under budget: upgrade the largest
    layer whose upgrade still fits, until none fits.
    """
    problem = _problem(scores, params, candidates, target_avg, error)
    bits_of, error_of, top = problem.candidates, problem.error, len(problem.candidates) - 1
    ranked = sorted(range(len(problem.scores)), key=lambda layer: -problem.scores[layer])
    group_size, larger_groups = divmod(len(ranked), len(bits_of))
    level = [0] * len(ranked)
    start = 0
    for group in range(len(bits_of)):
        end = start + group_size + (group < larger_groups)
        for layer in ranked[start:end]:
            level[layer] = top - group
        start = end

    def step_bits(layer: int, step: int) -> int:
        """Bits that moving `layer` by `step` candidate levels adds to the total."""
        return (bits_of[level[layer] + step] - bits_of[level[layer]]) * problem.params[layer]

    def downgrade_cost(layer: int) -> float:
        lower, current = bits_of[level[layer] - 1], bits_of[level[layer]]
        return problem.scores[layer] * (error_of(lower) - error_of(current)) / -step_bits(layer, -1)

    used = sum(bits_of[lv] * p for lv, p in zip(level, problem.params, strict=True))
    while used > problem.budget:
        layer = min((layer for layer in range(len(level)) if level[layer] > 0), key=downgrade_cost)
        used += step_bits(layer, -1)
        level[layer] -= 1
    while fitting := [
        layer
        for layer in range(len(level))
        if level[layer] < top and used + step_bits(layer, 1) <= problem.budget
    ]:
        layer = max(fitting, key=lambda layer: problem.params[layer])
        used += step_bits(layer, 1)
        level[layer] += 1
    return [bits_of[lv] for lv in level]


def solve_uniform(
    scores: Sequence[float],
    params: Sequence[int],
    candidates: Sequence[int],
    target_avg: float,
    error: ErrorModel | None = None,
) -> list[int]:
    """Every layer at `target_avg`, which must be one of the candidates (the W4A4 / W6A6 baselines)."""
    problem = _problem(scores, params, candidates, target_avg, error)
    if target_avg not in problem.candidates:
        raise AllocationError(
            f"uniform allocation needs target_avg={target_avg} among candidates {problem.candidates}"
        )
    return [int(target_avg)] * len(problem.scores)


SOLVERS = {"ilp": solve_ilp, "greedy": solve_greedy, "uniform": solve_uniform}
MEASURED_ERRORS = ("measured", "propagated", "mask")  # error models read from the importance tables
ERROR_CHOICES = (*ERROR_MODELS, *MEASURED_ERRORS)
ACTIVATION_MODES = ("shared", "fixed", "separate")


@dataclass(frozen=True)
class Allocation:
    """A solved allocation and its report; `plan` / `act_plan` are the `{layer: bits}` that quantization
    consumes for weights and for input activations. `average_bits` is parameter-weighted,
    `act_average_bits` weighted by the activation elements each layer quantizes (0 where not counted)."""

    method: str
    target_avg: float
    candidates: tuple[int, ...]
    names: tuple[str, ...]
    bits: tuple[int, ...]
    objective: float
    average_bits: float
    solve_seconds: float
    act_bits: tuple[int, ...] = ()
    act_average_bits: float = 0.0
    error: str = "pow2"
    activations: str = "shared"

    @property
    def plan(self) -> dict[str, int]:
        return dict(zip(self.names, self.bits, strict=True))

    @property
    def act_plan(self) -> dict[str, int]:
        return dict(zip(self.names, self.act_bits or self.bits, strict=True))

    @property
    def layers_per_width(self) -> dict[int, int]:
        return {b: self.bits.count(b) for b in sorted(set(self.bits))}


def cost_table(
    importance: Mapping[str, LayerImportance], candidates: Sequence[int], error: str, kind: str
) -> list[list[float]]:
    """Each layer's cost per candidate: `S_l * E(b)` for a formula, `S_l * e_l(b)` for `measured` (its relative
    output error), `g_l * e_l(b)` for `propagated` (that error times its downstream gain, `mqsam2.propagation`),
    the mask KL with the layer alone quantized at b for `mask`."""
    if error not in MEASURED_ERRORS:
        model = error_model(error)
        return [[layer.score * model(b) for b in candidates] for layer in importance.values()]
    rows = []
    for name, layer in importance.items():
        if error == "mask":
            table = layer.weight_mask_kl if kind == "w" else layer.act_mask_kl
        else:
            table = layer.weight_errors if kind == "w" else layer.act_errors
        if not table or any(str(b) not in table for b in candidates):
            raise AllocationError(
                f"layer {name} has no measured error at every candidate {list(candidates)}: measure it with "
                f"allocation.error: {error} (a run directory's importance.json from another setting must be deleted)"
            )
        if error == "propagated" and layer.gain is None:
            raise AllocationError(
                f"layer {name} has no downstream gain: measure the importance with gains "
                "(mqsam2.api.measure_importance(..., gains=True))"
            )
        weight = {"propagated": layer.gain, "mask": 1.0}.get(error, layer.score)
        rows.append([weight * table[str(b)] for b in candidates])
    return rows


def _act_elements(importance: Mapping[str, LayerImportance]) -> list[int]:
    elements = [layer.act_elements for layer in importance.values()]
    if not all(elements):
        raise AllocationError(
            "importance has no activation element counts (an importance.json from an older version): delete it "
            "so the importance stage counts them"
        )
    return elements


def allocate(
    importance: Mapping[str, LayerImportance],
    *,
    method: str = "ilp",
    target_avg: float,
    candidates: Sequence[int],
    error: str | ErrorModel = "pow2",
    activations: str = "shared",
) -> Allocation:
    """Solve Eq. 6 for the layers of `importance`; the keywords are the config's `allocation.*` keys.

    `activations`: `shared` gives a layer's input its weight's width (the paper); `fixed` keeps every input at
    `target_avg` and allocates the weights alone; `separate` allocates the inputs with their own budget,
    weighted by activation elements. The paper's reading (a formula error, shared widths) bounds the
    parameter-weighted average only; every other combination bounds both averages, so a mixed row spends no
    more than the uniform one of the same width.
    """
    if method not in SOLVERS:
        raise AllocationError(f"unknown allocation method {method!r}; expected one of {', '.join(SOLVERS)}")
    if activations not in ACTIVATION_MODES:
        raise AllocationError(
            f"unknown activation mode {activations!r}; expected one of {', '.join(ACTIVATION_MODES)}"
        )
    names = tuple(importance)
    scores = [layer.score for layer in importance.values()]
    params = [layer.num_params for layer in importance.values()]
    ascending = sorted(int(b) for b in candidates)
    start = time.perf_counter()
    measured = error in MEASURED_ERRORS
    paper_reading = not measured and activations == "shared"
    if paper_reading or method == "uniform":
        bits = SOLVERS[method](
            scores, params, candidates, target_avg, None if measured else error_model(error)
        )
        act_bits = bits
        solved = objective(scores, bits, None if measured else error)
    elif method != "ilp":
        raise AllocationError(
            f"allocation.method {method!r} solves the paper's reading only: use ilp with error {error!r} and "
            f"activations {activations!r}"
        )
    else:
        weight_costs = cost_table(importance, ascending, error, "w")
        act_costs = cost_table(importance, ascending, error, "a")
        elements = _act_elements(importance)
        if activations == "shared":
            joint = [
                [w + a for w, a in zip(wr, ar, strict=True)]
                for wr, ar in zip(weight_costs, act_costs, strict=True)
            ]
            bits = solve_table_ilp(joint, ascending, [(params, target_avg), (elements, target_avg)])
            act_bits = bits
        else:
            bits = solve_table_ilp(weight_costs, ascending, [(params, target_avg)])
            if activations == "fixed":
                act_bits = solve_uniform(scores, params, ascending, target_avg)
            else:
                act_bits = solve_table_ilp(act_costs, ascending, [(elements, target_avg)])
        solved = math.fsum(
            weight_costs[layer][ascending.index(b)] + act_costs[layer][ascending.index(a)]
            for layer, (b, a) in enumerate(zip(bits, act_bits, strict=True))
        )
    seconds = time.perf_counter() - start
    elements = [layer.act_elements for layer in importance.values()]
    return Allocation(
        method=method,
        target_avg=target_avg,
        candidates=tuple(ascending),
        names=names,
        bits=tuple(bits),
        objective=solved,
        average_bits=average_bits(params, bits),
        solve_seconds=seconds,
        act_bits=tuple(act_bits),
        act_average_bits=average_bits(elements, act_bits) if all(elements) else 0.0,
        error=error if isinstance(error, str) else "custom",
        activations=activations,
    )


def write_plan(allocation: Allocation, path: str | Path) -> Path:
    """Write plan.json: the report (method, target, candidates, objective, both averages, time), the weight
    `bits` and the activation `act_bits` per layer."""
    path = Path(path)
    report = {
        "method": allocation.method,
        "error": allocation.error,
        "activations": allocation.activations,
        "target_avg": allocation.target_avg,
        "candidates": list(allocation.candidates),
        "objective": allocation.objective,
        "average_bits": allocation.average_bits,
        "act_average_bits": allocation.act_average_bits,
        "solve_seconds": allocation.solve_seconds,
        "bits": allocation.plan,
        "act_bits": allocation.act_plan,
    }
    return write_text(path, json.dumps(report, indent=1) + "\n")


def read_plan(path: str | Path) -> dict[str, int]:
    """The weight `{layer: bits}` plan of a plan.json written by `write_plan`."""
    return json.loads(Path(path).read_text())["bits"]


def read_act_plan(path: str | Path) -> dict[str, int]:
    """The activation `{layer: bits}` plan of a plan.json (the weight plan for files that predate it)."""
    report = json.loads(Path(path).read_text())
    return report.get("act_bits", report["bits"])


def module_family(name: str) -> str:
    """The SAM2 module family of a layer name, as grouped in the allocation chart."""
    return next((family for family in FAMILIES if name.startswith(family + ".")), OTHER_FAMILY)
