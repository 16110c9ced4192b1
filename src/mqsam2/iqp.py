"""A chain-structured integer quadratic program over one choice per layer, solved exactly with PuLP/CBC.

    minimise    sum_l unary[l][k_l]  +  sum_l pair[l][k_l][k_(l+1)]
    subject to  sum_l weights[l][k_l] <= limit      for every budget (weights, limit)

With one-hot binaries x_lk (layer l takes option k, sum_k x_lk = 1) the unary terms and the budgets are
linear; each product x_lk * x_(l+1)k' of the pair terms becomes a binary z with the standard linearisation
z <= x_lk, z <= x_(l+1)k', z >= x_lk + x_(l+1)k' - 1, which equals the product at every binary point, so the
mixed-integer linear program has exactly the IQP's optimum. The marginal equalities sum_k' z = x_lk and
sum_k z = x_(l+1)k' also hold at every binary point; they are added because they make the LP relaxation of a
chain tight without budgets, so CBC proves optimality in few nodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pulp

from mqsam2.allocation import _CBC, _COST_SCALE, AllocationError, SolverError

Matrix = Sequence[Sequence[float]]


def iqp_objective(unary: Matrix, pair: Sequence[Matrix], choice: Sequence[int]) -> float:
    """The objective of one choice (an option index per layer)."""
    return math.fsum(row[k] for row, k in zip(unary, choice, strict=True)) + math.fsum(
        pair[layer][choice[layer]][choice[layer + 1]] for layer in range(len(pair))
    )


def _check(unary: Matrix, pair: Sequence[Matrix], budgets: Sequence[tuple[Matrix, float]]) -> int:
    if not unary:
        raise AllocationError("no layers to allocate")
    options = len(unary[0])
    if any(len(row) != options for row in unary):
        raise AllocationError("every layer needs one unary cost per option")
    if len(pair) != len(unary) - 1 or any(
        len(m) != options or any(len(r) != options for r in m) for m in pair
    ):
        raise AllocationError(
            f"{len(unary)} layers need {len(unary) - 1} pair matrices of {options}x{options}"
        )
    values = [v for row in unary for v in row] + [v for m in pair for r in m for v in r]
    if not all(math.isfinite(v) for v in values):
        raise AllocationError("IQP costs must be finite")
    for weights, _limit in budgets:
        if len(weights) != len(unary) or any(len(row) != options for row in weights):
            raise AllocationError("every budget needs one weight per layer and option")
    return options


def solve_iqp(unary: Matrix, pair: Sequence[Matrix], budgets: Sequence[tuple[Matrix, float]]) -> list[int]:
    """The option index per layer that minimises the objective within every budget, proven optimal."""
    options = _check(unary, pair, budgets)
    layers = range(len(unary))
    largest = max([abs(v) for row in unary for v in row] + [abs(v) for m in pair for r in m for v in r])
    scale = _COST_SCALE / largest if largest > 0 else 1.0
    model = pulp.LpProblem("iqp", pulp.LpMinimize)
    x = [[model.add_variable(f"x{i}_{k}", cat=pulp.LpBinary) for k in range(options)] for i in layers]
    z = [
        [
            [model.add_variable(f"z{i}_{k}_{j}", cat=pulp.LpBinary) for j in range(options)]
            for k in range(options)
        ]
        for i in layers[:-1]
    ]
    model += pulp.LpAffineExpression(
        [(x[i][k], scale * unary[i][k]) for i in layers for k in range(options)]
        + [
            (z[i][k][j], scale * pair[i][k][j])
            for i in layers[:-1]
            for k in range(options)
            for j in range(options)
        ]
    )
    for i in layers:
        model += pulp.lpSum(x[i]) == 1
    for i in layers[:-1]:
        for k in range(options):
            model += pulp.lpSum(z[i][k]) == x[i][k]
            model += pulp.lpSum(z[i][j][k] for j in range(options)) == x[i + 1][k]
            for j in range(options):
                model += z[i][k][j] <= x[i][k]
                model += z[i][k][j] <= x[i + 1][j]
                model += z[i][k][j] >= x[i][k] + x[i + 1][j] - 1
    for weights, limit in budgets:
        model += (
            pulp.LpAffineExpression((x[i][k], weights[i][k]) for i in layers for k in range(options)) <= limit
        )
    try:
        model.solve(_CBC)
    except pulp.PulpSolverError as failure:
        raise SolverError(f"CBC failed: {failure}") from failure
    if model.status == pulp.LpStatusInfeasible:
        raise AllocationError("no choice of widths fits every budget")
    if model.sol_status != pulp.LpSolutionOptimal:
        raise SolverError(
            f"CBC did not prove an optimum: status {pulp.LpStatus[model.status]}, "
            f"solution {pulp.LpSolution[model.sol_status]}"
        )
    choice = [max(range(options), key=lambda k, i=i: x[i][k].value()) for i in layers]
    for weights, limit in budgets:
        if math.fsum(weights[i][k] for i, k in enumerate(choice)) > limit:
            raise SolverError("CBC returned a choice over a budget")
    return choice
