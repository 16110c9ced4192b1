"""Bit allocation (Eq. 6): the ILP against brute-force enumeration, the greedy against hand-traced runs of
method.md §4, bad input, solver failures, and the plan / chart outputs."""

import itertools
import json
import math
import random

import pulp
import pytest
from PIL import Image

import mqsam2.allocation as allocation
from mqsam2.allocation import (
    AllocationError,
    SolverError,
    allocate,
    module_family,
    read_plan,
    solve_greedy,
    solve_ilp,
    solve_uniform,
    write_plan,
)
from mqsam2.allocation_figures import plot_allocation, plot_sensitivity
from mqsam2.importance import LayerImportance

# Evenly spaced sets get the ILP's symmetry-breaking pairs, the uneven ones do not.
CANDIDATE_SETS = [(3, 4, 5), (4, 5, 6, 7, 8), (2, 3, 4, 5, 6, 7, 8), (2, 8), (2, 3, 5, 8)]


def brute_force(scores, params, candidates, target_avg, error=lambda b: 2.0**-b):
    """Smallest objective over all assignments within the budget (exact: targets and averages are dyadic)."""
    feasible = (
        math.fsum(s * error(b) for s, b in zip(scores, bits, strict=True))
        for bits in itertools.product(candidates, repeat=len(scores))
        if sum(b * p for b, p in zip(bits, params, strict=True)) <= target_avg * sum(params)
    )
    return min(feasible)


def random_instance(rng: random.Random):
    """Instances small enough to enumerate, with many layers of equal size and many equal scores (ties).
    The parameter total is a power of two, so every achievable average and every target below is an exact
    float: tight budgets are exactly tight."""
    candidates = rng.choice(CANDIDATE_SETS)
    layers = rng.randint(1, 6 if len(candidates) <= 3 else 4)
    params = [rng.choice([1, 2, 2, 4, 4, 8]) for _ in range(layers - 1)]
    total = 2 ** (sum(params) + 1).bit_length()
    params.append(total - sum(params))
    scores = [rng.choice([0.0, 0.25, 1.0, 1.0, 3.0, 7.5]) for _ in range(layers)]
    budget_kind = rng.choice(["tight", "loose", "lowest", "highest"])
    if budget_kind == "tight":  # the exact average of some assignment
        bits = [rng.choice(candidates) for _ in range(layers)]
        target = sum(b * p for b, p in zip(bits, params, strict=True)) / total
    elif budget_kind == "loose":
        target = rng.randint(8 * min(candidates), 8 * max(candidates)) / 8
    else:
        target = float(min(candidates) if budget_kind == "lowest" else max(candidates))
    return scores, params, candidates, target


def is_feasible(bits, params, candidates, target_avg):
    used = sum(b * p for b, p in zip(bits, params, strict=True))
    return set(bits) <= set(candidates) and used <= target_avg * sum(params)


def test_ilp_equals_brute_force_on_random_instances():
    rng = random.Random(0)
    for _ in range(60):
        scores, params, candidates, target = random_instance(rng)
        bits = solve_ilp(scores, params, candidates, target)
        assert is_feasible(bits, params, candidates, target)
        assert allocation.objective(scores, bits) == pytest.approx(
            brute_force(scores, params, candidates, target), rel=1e-9, abs=1e-12
        )


@pytest.mark.parametrize(
    "error",
    [lambda b: 10.0 - b, lambda b: 100.0 - b * b],
    ids=["linear: convex, equal decrements", "concave: no symmetry-breaking pairs"],
)
def test_ilp_equals_brute_force_with_a_pluggable_error_model(error):
    rng = random.Random(1)
    for _ in range(25):
        scores, params, candidates, target = random_instance(rng)
        bits = solve_ilp(scores, params, candidates, target, error=error)
        assert allocation.objective(scores, bits, error) == pytest.approx(
            brute_force(scores, params, candidates, target, error), rel=1e-9
        )


def test_ilp_with_a_single_candidate():
    assert solve_ilp([1.0, 2.0], [3, 4], [4], 4) == [4, 4]


def test_greedy_is_feasible_and_never_better_than_the_ilp():
    rng = random.Random(2)
    for _ in range(40):
        candidates = rng.choice(CANDIDATE_SETS)
        layers = rng.randint(1, 40)
        scores = [rng.lognormvariate(0, 2) for _ in range(layers)]
        params = [rng.randint(1, 10**6) for _ in range(layers)]
        target = rng.uniform(min(candidates), max(candidates))
        greedy = solve_greedy(scores, params, candidates, target)
        exact = solve_ilp(scores, params, candidates, target)
        assert is_feasible(greedy, params, candidates, target)
        assert allocation.objective(scores, greedy) >= allocation.objective(scores, exact) * (1 - 1e-9)


def test_greedy_downgrades_the_cheapest_layer_per_freed_bit():
    # Start (4 layers into 3 groups of 2, 1, 1): [5, 5, 4, 3] = 17 bits, budget 3.5 * 4 = 14. Cost per freed
    # bit S * (E(b-1) - E(b)): layer 2 (4->3) 2/16 < layer 1 5/32 < layer 0 9/32, so layer 2 then layer 1
    # (5->4); then layer 0 (9/32) beats layer 1 again (4->3, 5/16): [4, 4, 3, 3] = 14 bits, and nothing fits.
    assert solve_greedy([9, 5, 2, 1], [1, 1, 1, 1], [3, 4, 5], 3.5) == [4, 4, 3, 3]


def test_greedy_upgrades_the_largest_layer_that_fits():
    # Start [5, 4, 3] = 5 + 4 + 18 = 27 bits of a budget of 32: layer 2 (6 params) cannot go up, layer 1 can.
    assert solve_greedy([3, 2, 1], [1, 1, 6], [3, 4, 5], 4) == [5, 5, 3]
    # Start [5, 4, 3] = 5 + 8 + 9 = 22 bits of floor(4.17 * 6) = 25: layer 1 (+2) and layer 2 (+3) both
    # fit; the larger, layer 2, goes up although layer 1 is more important, and then the budget is spent.
    assert solve_greedy([3, 2, 1], [1, 2, 3], [3, 4, 5], 4.17) == [5, 4, 4]


def test_uniform_gives_every_layer_the_target():
    assert solve_uniform([1.0, 2.0], [3, 4], [3, 4, 5], 4) == [4, 4]
    with pytest.raises(AllocationError, match="among candidates"):
        solve_uniform([1.0], [3], [3, 5], 4)


@pytest.mark.parametrize("solve", [solve_ilp, solve_greedy, solve_uniform])
@pytest.mark.parametrize(
    ("scores", "params", "candidates", "target", "message"),
    [
        ([1.0], [10], [3, 4, 5], 2.5, r"target_avg=2.5 is outside the feasible range \[3, 5\]"),
        ([1.0], [10], [3, 4, 5], 6, r"target_avg=6 is outside the feasible range \[3, 5\]"),
        ([1.0], [10], [3, 4, 5], math.nan, "outside the feasible range"),
        ([1.0], [10], [], 4, "no candidate bit-widths"),
        ([1.0], [10], [4, 4, 5], 4, "duplicate candidate"),
        ([1.0], [10], [0, 4], 4, "positive integers"),
        ([1.0], [10], [3.5, 4], 4, "positive integers"),
        ([math.nan], [10], [3, 4, 5], 4, "score of layer 0 is nan"),
        ([1.0, -0.5], [10, 10], [3, 4, 5], 4, "score of layer 1 is -0.5"),
        ([1.0], [0], [3, 4, 5], 4, "parameter count of layer 0 is 0"),
        ([1.0, 2.0], [10], [3, 4, 5], 4, "2 scores but 1 parameter counts"),
        ([], [], [3, 4, 5], 4, "no layers"),
    ],
)
def test_bad_input_is_one_line_error(solve, scores, params, candidates, target, message):
    with pytest.raises(AllocationError, match=message) as raised:
        solve(scores, params, candidates, target)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("error", [lambda b: 2.0**b, lambda b: math.nan, lambda b: 1.0])
def test_error_model_must_fall_as_bits_grow(error):
    with pytest.raises(AllocationError, match="error model"):
        solve_ilp([1.0, 2.0], [5, 5], [3, 4, 5], 4, error=error)


class _StopsEarly(pulp.LpSolver):
    """What CBC reports when a limit stops it: status Optimal, but the solution only integer-feasible."""

    def actualSolve(self, lp, **kwargs):
        lp.assignStatus(pulp.LpStatusOptimal, pulp.LpSolutionIntegerFeasible)
        return lp.status


@pytest.mark.parametrize("solver", [_StopsEarly(), pulp.COIN_CMD(path="/nonexistent/cbc", msg=False)])
def test_solver_failure_is_reported_not_replaced_by_the_greedy(monkeypatch, solver):
    monkeypatch.setattr(allocation, "_CBC", solver)
    with pytest.raises(SolverError):
        solve_ilp([1.0, 2.0], [5, 5], [3, 4, 5], 4)


def test_allocate_writes_a_plan_that_reads_back(tmp_path):
    importance = {
        "image_encoder.trunk.blocks.0.attn.qkv": LayerImportance(4.0, 300),
        "memory_attention.layers.0.linear1": LayerImportance(1.0, 100),
        "sam_mask_decoder.conv_s0": LayerImportance(0.5, 100),
    }
    result = allocate(importance, method="ilp", target_avg=4, candidates=[5, 3, 4], error="pow4")
    assert result.candidates == (3, 4, 5)
    assert result.plan == dict(zip(importance, result.bits, strict=True))
    assert result.average_bits == pytest.approx(
        sum(b * p.num_params for b, p in zip(result.bits, importance.values(), strict=True)) / 500
    )
    assert result.average_bits <= 4
    assert result.objective == pytest.approx(
        brute_force([4.0, 1.0, 0.5], [300, 100, 100], [3, 4, 5], 4, lambda b: 4.0**-b)
    )
    path = write_plan(result, tmp_path / "plan.json")
    assert read_plan(path) == result.plan
    assert json.loads(path.read_text())["method"] == "ilp"
    assert allocate(importance, method="uniform", target_avg=4, candidates=[3, 4, 5]).bits == (4, 4, 4)
    with pytest.raises(AllocationError, match="unknown allocation method"):
        allocate(importance, method="dp", target_avg=4, candidates=[3, 4, 5])
    with pytest.raises(AllocationError, match="unknown error model"):
        allocate(importance, target_avg=4, candidates=[3, 4, 5], error="pow3")


def test_module_families_follow_sam2_top_level_modules():
    assert module_family("image_encoder.trunk.blocks.3.mlp.layers.0") == "image_encoder.trunk"
    assert module_family("image_encoder.neck.convs.0.conv") == "image_encoder.neck"
    assert module_family("memory_encoder.fuser.layers.0.dwconv") == "memory_encoder"
    assert module_family("sam_mask_decoder.transformer.layers.0.self_attn.q_proj") == "sam_mask_decoder"
    assert module_family("obj_ptr_proj.layers.0") == "other heads"


def test_plot_allocation_writes_a_png(tmp_path):
    names = ["image_encoder.trunk.a", "image_encoder.trunk.b", "memory_attention.c", "obj_ptr_proj.layers.0"]
    path = plot_allocation(names, [5, 4, 3, 4], [2.0, 1.0, 0.1, 0.0], tmp_path / "allocation.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sensitivity_picture_has_an_error_panel_only_where_errors_were_measured(tmp_path):
    names = ["image_encoder.trunk.a", "image_encoder.trunk.b", "memory_attention.c", "obj_ptr_proj.layers.0"]
    errors = {str(b): 2.0**-b for b in (3, 4, 5)}
    plain = {n: LayerImportance(1.0 + i, 100 * (i + 1), 50) for i, n in enumerate(names)}
    measured = {
        n: layer._replace(weight_errors=errors, act_errors=errors, gain=0.5) for n, layer in plain.items()
    }
    heights = []
    for importance, error in ((plain, "pow2"), (measured, "propagated")):
        solved = allocate(importance, target_avg=4, candidates=[3, 4, 5], error=error, activations="separate")
        path = plot_sensitivity(solved, importance, tmp_path / f"{error}.png")
        with Image.open(path) as image:
            heights.append(image.size[1])
    assert heights[1] > heights[0]


def brute_force_table(costs, candidates, budgets):
    """Smallest total cost over all assignments within every (weights, target) budget (exact enumeration)."""
    feasible = (
        math.fsum(costs[layer][candidates.index(b)] for layer, b in enumerate(bits))
        for bits in itertools.product(candidates, repeat=len(costs))
        if all(
            sum(b * w for b, w in zip(bits, weights, strict=True)) <= target * sum(weights)
            for weights, target in budgets
        )
    )
    return min(feasible)


def test_measured_table_ilp_equals_brute_force_with_one_or_two_budgets():
    rng = random.Random(1)
    for _ in range(40):
        candidates = list(rng.choice([(3, 4, 5), (5, 6, 7), (2, 3, 5, 8)]))
        layers = rng.randint(1, 5)
        # Measured errors fall with the width but not by a common factor per layer: tables, not S_l * E(b).
        costs = [
            sorted((rng.choice([0.0, 0.5, 1.0, 2.0, 7.0]) for _ in candidates), reverse=True)
            for _ in range(layers)
        ]
        params = [rng.choice([1, 2, 4, 8]) for _ in range(layers)]
        elements = [rng.choice([1, 3, 4, 16]) for _ in range(layers)]
        target = rng.choice([min(candidates), (min(candidates) + max(candidates)) / 2, max(candidates)])
        budgets = [(params, target)] if rng.random() < 0.5 else [(params, target), (elements, target)]
        bits = allocation.solve_table_ilp(costs, candidates, budgets)
        total = math.fsum(costs[layer][candidates.index(b)] for layer, b in enumerate(bits))
        assert total == pytest.approx(brute_force_table(costs, candidates, budgets), rel=1e-9, abs=1e-12)
        for weights, limit in budgets:
            assert sum(b * w for b, w in zip(bits, weights, strict=True)) <= limit * sum(weights)


def test_table_cost_that_rises_with_width_is_never_a_reason_to_spend_fewer_bits():
    # Noise can make a measured error rise by a hair at a larger width; the layer then costs its lowest so far.
    assert allocation.solve_table_ilp([[1.0, 0.2, 0.3]], [3, 4, 5], [([1], 5)]) in ([4], [5])


def importance_with_tables():
    def table(values):
        return {str(b): v for b, v in zip((3, 4, 5), values, strict=True)}

    return {
        "big.fc": LayerImportance(1.0, 8, 64, table([0.02, 0.01, 0.005]), table([0.9, 0.4, 0.2])),
        "small.qkv": LayerImportance(1.0, 2, 4, table([0.5, 0.2, 0.1]), table([0.05, 0.02, 0.01])),
    }


@pytest.mark.parametrize("activations", ["shared", "fixed", "separate"])
def test_measured_allocation_keeps_both_averages_within_the_target(activations):
    result = allocate(
        importance_with_tables(),
        target_avg=4,
        candidates=[3, 4, 5],
        error="measured",
        activations=activations,
    )
    assert result.average_bits <= 4 and result.act_average_bits <= 4
    if activations == "fixed":
        assert set(result.act_bits) == {4}
    if activations == "separate":
        # By hand: weights (budget 40 bits over 10 parameters) do best at big 3 + small 5 (cost 0.12 < 0.21 for
        # 4 + 4); inputs (budget 272 over 68 elements) at 4 + 4 (0.42 < 0.91 for 3 + 5).
        assert result.plan == {"big.fc": 3, "small.qkv": 5}
        assert result.act_plan == {"big.fc": 4, "small.qkv": 4}


def test_measured_allocation_without_tables_or_counts_says_what_to_delete():
    plain = {"a": LayerImportance(1.0, 4), "b": LayerImportance(2.0, 4)}
    with pytest.raises(AllocationError, match="no measured error"):
        allocate(plain, target_avg=4, candidates=[3, 4, 5], error="measured", activations="separate")
    with pytest.raises(AllocationError, match="activation element counts"):
        allocate(plain, target_avg=4, candidates=[3, 4, 5], activations="separate")


def test_propagated_allocation_weighs_each_error_by_its_downstream_gain():
    # The tables above, but the big layer's errors reach the masks 20x as strongly as the small one's. By hand,
    # separate budgets: weights big 3 + small 5 cost 20*0.02 + 0.1 = 0.5, big 4 + small 4 cost 20*0.01 + 0.2 =
    # 0.4, so 4 + 4 (the Eq. 4 weighting above chose 3 + 5); inputs 4 + 4 as before.
    importance = {
        name: layer._replace(gain=gain)
        for (name, layer), gain in zip(importance_with_tables().items(), (20.0, 1.0), strict=True)
    }
    result = allocate(
        importance, target_avg=4, candidates=[3, 4, 5], error="propagated", activations="separate"
    )
    assert result.plan == {"big.fc": 4, "small.qkv": 4} and result.act_plan == {"big.fc": 4, "small.qkv": 4}
    assert result.objective == pytest.approx(20 * 0.01 + 0.2 + 20 * 0.4 + 0.02)
    with pytest.raises(AllocationError, match="no downstream gain"):
        allocate(importance_with_tables(), target_avg=4, candidates=[3, 4, 5], error="propagated")


def test_mask_allocation_reads_the_mask_kl_tables_not_the_layer_errors():
    # The mask KL tables swap which layer is sensitive: the big layer's weight costs 10x per step what the
    # small one's does. By hand, weights (40 bits over 10 parameters): big 3 + small 5 costs 1.0 + 0.001, big 4
    # + small 4 costs 0.3 + 0.004, so 4 + 4 (the layer-local errors above chose 3 + 5); inputs (272 over 68
    # elements): big 5 + small 3 is over budget (5*64 + 3*4 = 332), big 4 + small 4 costs 0.04 + 0.02.
    def table(values):
        return {str(b): v for b, v in zip((3, 4, 5), values, strict=True)}

    importance = {
        name: layer._replace(weight_mask_kl=table(w), act_mask_kl=table(a))
        for (name, layer), w, a in zip(
            importance_with_tables().items(),
            ([1.0, 0.3, 0.1], [0.01, 0.004, 0.001]),
            ([0.1, 0.04, 0.01], [0.05, 0.02, 0.01]),
            strict=True,
        )
    }
    result = allocate(importance, target_avg=4, candidates=[3, 4, 5], error="mask", activations="separate")
    assert result.plan == {"big.fc": 4, "small.qkv": 4} and result.act_plan == {"big.fc": 4, "small.qkv": 4}
    assert result.objective == pytest.approx(0.3 + 0.004 + 0.04 + 0.02)
    with pytest.raises(AllocationError, match="no measured error"):
        allocate(importance_with_tables(), target_avg=4, candidates=[3, 4, 5], error="mask")
