"""Baselines for reports: a uniform type mix (ignores costs) and a per-layer budget (PMQ / MC-MoE
style). They return the same Allocation as GEMQ so reports compare like with like."""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import GemqError
from .gemq import solve_gemq
from .problem import AllocationProblem, UnitKey, cap_bits, check_budget
from .result import Allocation, make_allocation, relative_gap


def uniform_order(units: Sequence[UnitKey]) -> np.ndarray:
    """Deterministic order (layer, expert, proj) for who gets the higher type in a uniform split."""
    def key(i: int) -> tuple[int, int, str]:
        layer, expert, proj = units[i]
        return (layer, -1 if expert is None else expert, "" if proj is None else proj)

    return np.array(sorted(range(len(units)), key=key), dtype=np.int64)


def solve_uniform(
    problem: AllocationProblem,
    budget_bpw: float,
    max_types: int | None = 3,
    **_ignored: Any,
) -> Allocation:
    """The closest uniform type mix: everyone at the widest type that fits, plus the next wider type
    for as many units as fit, in (layer, expert) order. Ignores costs by design (it is the baseline)."""
    check_budget(problem, budget_bpw)
    t0 = time.perf_counter()
    cap = cap_bits(problem, budget_bpw)
    bits, allowed = problem.bit_matrix, problem.allowed
    order_t = np.argsort(problem.bpw, kind="stable")
    rows = np.arange(problem.n_units)

    def all_at(t: int) -> np.ndarray:
        """Type t where allowed, else the widest allowed type below it (or the narrowest allowed)."""
        b = np.where(allowed, bits, np.inf)
        below = np.where(allowed & (bits <= bits[:, [t]] * (1 + 1e-12)), bits, -np.inf)
        pick = below.argmax(axis=1)
        none = ~np.isfinite(below[rows, pick])
        pick[none] = b[none].argmin(axis=1)
        return pick

    lo_choice = all_at(int(order_t[0]))
    lo_pos = 0
    for pos, t in enumerate(order_t):
        c = all_at(int(t))
        if bits[rows, c].sum() <= cap * (1 + 1e-12):
            lo_choice, lo_pos = c, pos
    choice = lo_choice.copy()
    if lo_pos + 1 < len(order_t) and (max_types is None or max_types >= 2):
        t_hi = int(order_t[lo_pos + 1])
        used = float(bits[rows, choice].sum())
        for u in uniform_order(problem.units):
            if not allowed[u, t_hi]:
                continue
            db = bits[u, t_hi] - bits[u, choice[u]]
            if db > 0 and used + db <= cap:
                choice[u] = t_hi
                used += db
    return make_allocation(
        problem, choice, strategy="uniform", budget_bpw=budget_bpw, status="heuristic",
        gap=float("nan"), bound=float("nan"), seconds=time.perf_counter() - t0,
        method="uniform", max_types=max_types,
    )


def solve_layerwise(
    problem: AllocationProblem,
    budget_bpw: float,
    max_types: int | None = 3,
    time_limit: float = 60.0,
    mip_rel_gap: float = 1e-4,
    paper_constraint: bool = False,
    method: str = "auto",
) -> Allocation:
    """Every layer gets the same bpw budget, solved per layer with the GEMQ solver."""
    check_budget(problem, budget_bpw)
    t0 = time.perf_counter()
    layers = problem.layers
    uniq = np.unique(layers)
    choice = np.empty(problem.n_units, dtype=np.int64)
    statuses, bound = [], 0.0
    for i, layer in enumerate(uniq):
        idx = np.flatnonzero(layers == layer)
        sub = problem.subset(idx)
        lo, _hi = sub.bpw_range()
        if budget_bpw < lo * (1 - 1e-12):
            raise GemqError(
                f"Layerwise: layer {layer} cannot reach {budget_bpw:g} bpw (its lowest is {lo:.4f}).",
                "raise --budget or use --strategy gemq, which shares bits across layers.",
            )
        left = max(0.5, (time_limit - (time.perf_counter() - t0)) / (len(uniq) - i))
        a = solve_gemq(sub, budget_bpw, max_types, left, mip_rel_gap, paper_constraint, method)
        choice[idx] = a.type_index
        statuses.append(a.status)
        bound += a.bound if np.isfinite(a.bound) else np.nan
    status = "optimal" if all(s == "optimal" for s in statuses) else "time_limit"
    return make_allocation(
        problem, choice, strategy="layerwise", budget_bpw=budget_bpw, status=status,
        gap=relative_gap(problem.cost_of(choice), bound), bound=bound, seconds=time.perf_counter() - t0,
        method="milp-per-layer", max_types=max_types,
    )
