"""GEMQ allocation: optimality against brute force, constraints, baselines, errors, JSON."""
from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest

from gemq_gguf.allocate import (
    Allocation,
    AllocationProblem,
    bpw_of,
    default_groups,
    solve,
    solve_gemq,
    solve_layerwise,
    solve_lp_round,
    solve_milp,
    solve_uniform,
    violations,
)
from gemq_gguf.errors import GemqError
from synthetic import synthetic_problem

TYPES3 = ["Q2_K", "Q4_K", "Q6_K"]


def random_problem(seed: int, n_units: int = 5, grouped: bool = False, n_layers: int = 2) -> AllocationProblem:
    """Small instance with uneven unit sizes and non-monotone costs, so the knapsack is not trivial."""
    rng = np.random.default_rng(seed)
    units = [(i % n_layers, i, None) for i in range(n_units)]
    bpw = bpw_of(TYPES3)
    cost = rng.uniform(0, 1, (n_units, 3)) * np.array([4.0, 2.0, 1.0]) * rng.uniform(0.1, 3, (n_units, 1))
    params = rng.integers(1, 10, n_units).astype(float) * 256
    groups = [np.arange(n_units)] if grouped else []
    return AllocationProblem(units=units, types=TYPES3, cost=cost, params=params, bpw=bpw, groups=groups)


def brute_force(p: AllocationProblem, budget: float, max_types: int | None, paper: bool = False) -> float:
    best = np.inf
    for combo in itertools.product(range(p.n_types), repeat=p.n_units):
        c = np.array(combo)
        if not violations(p, c, budget, max_types, paper):
            best = min(best, float(p.cost[np.arange(p.n_units), c].sum()))
    return best


def mid_budget(p: AllocationProblem, seed: int) -> float:
    lo, hi = p.bpw_range()
    return float(lo + (hi - lo) * np.random.default_rng(seed + 100).uniform(0.1, 0.9))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("grouped", [False, True])
def test_milp_equals_brute_force(seed: int, grouped: bool) -> None:
    p = random_problem(seed, grouped=grouped)
    budget = mid_budget(p, seed)
    max_types = 2 if grouped else None
    a = solve_gemq(p, budget, max_types=max_types, mip_rel_gap=1e-9, method="milp")
    assert not violations(p, a.type_index, budget, max_types)
    assert a.total_cost == pytest.approx(brute_force(p, budget, max_types), rel=1e-9, abs=1e-12)
    assert a.status == "optimal"


@pytest.mark.parametrize("seed", range(4))
def test_plain_highs_equals_brute_force(seed: int) -> None:
    p = random_problem(seed + 30, grouped=True)
    budget = mid_budget(p, seed)
    a = solve_milp(p, budget, max_types=2, mip_rel_gap=1e-9)
    assert a is not None and a.method == "milp"
    assert a.total_cost == pytest.approx(brute_force(p, budget, 2), rel=1e-9)


@pytest.mark.parametrize("budget", [2.6, 3.1, 4.0])
def test_variable_fixing_keeps_the_optimum(budget: float) -> None:
    p = synthetic_problem(3, 8, seed=12)
    fixed = solve_gemq(p, budget, max_types=2, mip_rel_gap=1e-9, method="milp")
    plain = solve_milp(p, budget, max_types=2, mip_rel_gap=1e-9)
    assert plain is not None and fixed.status == "optimal"
    assert fixed.total_cost == pytest.approx(plain.total_cost, rel=1e-8)
    assert fixed.bound <= fixed.total_cost * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_auto_and_lp_round_are_feasible_with_valid_bound(seed: int) -> None:
    p = random_problem(seed + 50, n_units=6, grouped=True)
    budget = mid_budget(p, seed)
    opt = brute_force(p, budget, 2)
    auto = solve_gemq(p, budget, max_types=2, mip_rel_gap=1e-9)
    assert auto.total_cost == pytest.approx(opt, rel=1e-9)
    lp = solve_lp_round(p, budget, max_types=2)
    assert not violations(p, lp.type_index, budget, 2)
    assert lp.total_cost >= opt - 1e-12
    assert lp.bound <= opt * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_paper_constraint_matches_brute_force(seed: int) -> None:
    p = random_problem(seed + 7, n_units=6, n_layers=2)
    lo, hi = p.bpw_range()
    budget = lo + 0.6 * (hi - lo)
    a = solve_gemq(p, budget, max_types=None, mip_rel_gap=1e-9, paper_constraint=True)
    assert not violations(p, a.type_index, budget, None, paper_constraint=True)
    assert a.total_cost == pytest.approx(brute_force(p, budget, None, paper=True), rel=1e-9)
    for layer in (0, 1):
        chosen = {a.choice[i] for i, u in enumerate(a.units) if u[0] == layer}
        assert {"Q4_K", "Q6_K"} <= chosen


def test_respects_budget_and_max_types_on_realistic_instance() -> None:
    p = synthetic_problem(4, 24, seed=3)
    for budget in (2.5, 3.0, 5.0):
        a = solve_gemq(p, budget, max_types=3, time_limit=10, mip_rel_gap=1e-4)
        assert a.bpw <= budget + 1e-9
        assert a.bits_used <= budget * p.total_params * (1 + 1e-12)
        assert not violations(p, a.type_index, budget, 3)
        for g in p.groups:
            assert len(set(a.type_index[g].tolist())) <= 3
        assert a.gap <= 1e-3


def test_expert_proj_groups_are_per_projection() -> None:
    p = synthetic_problem(3, 8, projs=("gate_up", "down"), seed=1)
    assert len(p.groups) == 6
    a = solve_gemq(p, 3.2, max_types=2, time_limit=20)
    assert not violations(p, a.type_index, 3.2, 2)


def test_infeasible_budget_raises_with_range_and_fix() -> None:
    p = synthetic_problem(2, 4)
    lo, hi = p.bpw_range()
    for solver in (solve_gemq, solve_layerwise, solve_uniform):
        with pytest.raises(GemqError) as e:
            solver(p, 1.5)
        msg = str(e.value)
        assert f"{lo:.4f}" in msg and f"{hi:.4f}" in msg
        assert "Fix:" in msg and e.value.fix


def test_budget_above_max_gives_widest_types() -> None:
    p = synthetic_problem(2, 4)
    a = solve_gemq(p, 9.0, max_types=3)
    assert set(a.choice) == {"Q6_K"}


def test_disallowed_types_never_chosen() -> None:
    p0 = synthetic_problem(2, 8, seed=4)
    cost = p0.cost.copy()
    q6 = p0.types.index("Q6_K")
    cost[::2, q6] = np.inf  # e.g. a shape this type cannot take
    p = AllocationProblem.build(p0.units, p0.types, cost, p0.params)
    for strat in ("gemq", "layerwise", "uniform"):
        a = solve(strat, p, 6.5)
        assert np.isfinite(a.unit_cost).all()
        assert not (a.type_index[::2] == q6).any()


def test_exact_bits_override_is_what_the_budget_counts() -> None:
    p0 = synthetic_problem(2, 8, seed=5)
    bits = p0.bit_matrix * np.linspace(0.9, 1.1, p0.n_units)[:, None]
    p = AllocationProblem.build(p0.units, p0.types, p0.cost, p0.params, bits=bits)
    a = solve_gemq(p, 3.0)
    assert a.bits_used == pytest.approx(bits[np.arange(p.n_units), a.type_index].sum())
    assert a.bits_used <= 3.0 * p.total_params


def test_uniform_is_closest_type_mix_and_ignores_costs() -> None:
    p = synthetic_problem(4, 8, seed=6)
    a = solve_uniform(p, 3.2)
    assert set(a.choice) == {"Q3_K", "IQ3_XXS"}  # 3.0625 <= 3.2 < 3.4375
    assert a.bpw <= 3.2
    assert 3.2 - a.bpw < 0.375 / p.n_units + 1e-9  # within one unit's step of the budget
    shuffled = AllocationProblem.build(p.units, p.types, p.cost[::-1].copy(), p.params)
    assert np.array_equal(solve_uniform(shuffled, 3.2).type_index, a.type_index)
    exact = solve_uniform(p, 4.5)
    assert set(exact.choice) == {"Q4_K"}


def test_layerwise_meets_budget_in_every_layer() -> None:
    p = synthetic_problem(3, 16, seed=7)
    a = solve_layerwise(p, 3.0)
    assert a.strategy == "layerwise"
    layers = p.layers
    for layer in np.unique(layers):
        m = layers == layer
        assert a.unit_bits[m].sum() <= 3.0 * p.params[m].sum() * (1 + 1e-12)
    assert not violations(p, a.type_index, 3.0, 3)


@pytest.mark.parametrize("budget", [2.5, 3.0, 3.5, 4.4])
def test_gemq_is_never_worse_than_baselines(budget: float) -> None:
    p = synthetic_problem(3, 8, seed=8)
    g = solve("gemq", p, budget, mip_rel_gap=1e-9, time_limit=20)
    lw = solve("layerwise", p, budget, mip_rel_gap=1e-9, time_limit=20)
    un = solve("uniform", p, budget)
    assert g.total_cost <= lw.total_cost * (1 + 1e-9)
    assert g.total_cost <= un.total_cost * (1 + 1e-9)
    assert lw.total_cost <= un.total_cost * (1 + 1e-9)  # holds on these costs; not a theorem


def test_unknown_strategy_and_type_are_user_errors() -> None:
    p = synthetic_problem(1, 2)
    with pytest.raises(GemqError):
        solve("greedy", p, 3.0)
    with pytest.raises(GemqError):
        bpw_of(["Q3_X"])


def test_json_round_trip_totals() -> None:
    p = synthetic_problem(3, 8, seed=9)
    a = solve_gemq(p, 3.0)
    d = json.loads(a.to_json())
    assert d["predicted_loss_increase"] == pytest.approx(sum(u["cost"] for u in d["units"]))
    assert d["bits_used"] == pytest.approx(sum(u["bits"] for u in d["units"]))
    b = Allocation.from_json(a.to_json())
    assert b.total_cost == pytest.approx(a.total_cost)
    assert b.bits_used == pytest.approx(a.bits_used)
    assert b.choice == a.choice and b.units == a.units
    assert b.plan() == a.plan()


def test_default_groups_by_layer_and_projection() -> None:
    units = [(0, 0, None), (0, 1, None), (1, 0, None), (0, None, "down"), (0, None, "up")]
    groups = [sorted(g.tolist()) for g in default_groups(units)]
    assert sorted(groups) == [[0, 1], [2], [3], [4]]


@pytest.mark.slow
def test_scale_10k_units_solves_within_time_limit() -> None:
    p = synthetic_problem(40, 256, seed=0)
    t0 = time.perf_counter()
    a = solve_gemq(p, 3.0, max_types=3, time_limit=30)
    assert time.perf_counter() - t0 < 45
    assert not violations(p, a.type_index, 3.0, 3)
    assert a.gap < 1e-3


def test_tensor_granularity_from_expert_proj_costs() -> None:
    from gemq_gguf.allocate import expand, to_expert_granularity, to_tensor_granularity

    p = synthetic_problem(3, 4, projs=("gate", "up", "down"), seed=11)
    t, members = to_tensor_granularity(p)
    assert t.n_units == 9 and all(u[1] is None for u in t.units)
    assert t.cost.sum() == pytest.approx(p.cost.sum())
    assert t.total_params == pytest.approx(p.total_params)
    a = solve_gemq(t, 3.3)
    per_unit = expand(a.choice, members, p.n_units)
    rows = np.arange(p.n_units)
    ti = np.array([p.types.index(x) for x in per_unit])
    assert p.cost[rows, ti].sum() == pytest.approx(a.total_cost)
    assert p.bit_matrix[rows, ti].sum() <= 3.3 * p.total_params * (1 + 1e-12)
    e, _ = to_expert_granularity(p)
    assert e.n_units == 12 and len(e.groups) == 3
    # finer units can only do better at the same budget
    assert solve_gemq(p, 3.3, max_types=None, mip_rel_gap=1e-9).total_cost <= a.total_cost * (1 + 1e-9)


def test_every_strategy_the_cli_offers_has_a_solver() -> None:
    from gemq_gguf.allocate import SOLVERS
    from gemq_gguf.options import STRATEGIES
    assert set(SOLVERS) == set(STRATEGIES)
