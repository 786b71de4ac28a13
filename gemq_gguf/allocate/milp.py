"""The exact model: one sparse MILP over all units, solved by HiGHS (`scipy.optimize.milp`).

    minimize   sum cost[u,t] x[u,t]
    subject to sum_t x[u,t] = 1                                  (one type per unit)
               sum bits[u,t] x[u,t] <= budget * sum params
               y[g,t] >= x[u,t], sum_t y[g,t] <= max_types       (per (layer, projection) tensor g)
               optional: each layer keeps >= 1 unit at each of the two widest types (paper)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from .greedy import greedy_repair
from .problem import (
    AllocationProblem,
    check_budget,
    constrained_groups,
    paper_rows,
    raise_infeasible,
    violations,
)
from .result import Allocation, make_allocation, relative_gap


@dataclass(frozen=True)
class MilpModel:
    c: np.ndarray
    integrality: np.ndarray
    constraints: list[LinearConstraint]
    var_unit: np.ndarray  # x variables: unit index
    var_type: np.ndarray  # x variables: type index
    n_x: int
    scale: float


def build_model(
    problem: AllocationProblem,
    budget_bpw: float,
    max_types: int | None,
    paper_constraint: bool,
) -> MilpModel:
    """Sparse MILP: x[u,t] only for allowed pairs, y[g,t] only for groups that could break max-types.

    Costs are scaled to O(1) so HiGHS's absolute gap tolerance does not stop early on tiny costs;
    bits are divided by total params so the budget row reads in bpw.
    """
    allowed = problem.allowed
    vu, vt = np.nonzero(allowed)
    n_x = vu.size
    cost = problem.cost[vu, vt]
    scale = float(cost.max()) if cost.size and cost.max() > 0 else 1.0
    bits = problem.bit_matrix[vu, vt] / problem.total_params
    U = problem.n_units

    blocks_A: list[sparse.coo_matrix] = []
    lbs: list[np.ndarray] = []
    ubs: list[np.ndarray] = []

    # one type per unit
    blocks_A.append(sparse.coo_matrix((np.ones(n_x), (vu, np.arange(n_x))), shape=(U, n_x)))
    lbs.append(np.ones(U))
    ubs.append(np.ones(U))
    # budget
    blocks_A.append(sparse.coo_matrix((bits, (np.zeros(n_x, dtype=np.int64), np.arange(n_x))), shape=(1, n_x)))
    lbs.append(np.array([-np.inf]))
    ubs.append(np.array([float(budget_bpw)]))

    # max-types: y[g,t] >= x[u,t] (disaggregated: tight LP, keeps the relaxation useful)
    var_of = {(int(a), int(b)): k for k, (a, b) in enumerate(zip(vu, vt))}
    link_r, link_c, link_v = [], [], []
    cnt_r, cnt_c = [], []
    n_y = 0
    n_link = 0
    groups = constrained_groups(problem, max_types)
    for gi, g in enumerate(groups):
        g_types = np.flatnonzero(allowed[g].any(axis=0))
        for t in g_types:
            y = n_x + n_y
            n_y += 1
            cnt_r.append(gi)
            cnt_c.append(y)
            for u in g[allowed[g, t]]:
                k = var_of[(int(u), int(t))]
                link_r += [n_link, n_link]
                link_c += [k, y]
                link_v += [1.0, -1.0]
                n_link += 1
    n_var = n_x + n_y
    blocks = [b.tocsr() for b in blocks_A]
    blocks = [sparse.csr_matrix((b.data, b.indices, b.indptr), shape=(b.shape[0], n_var)) for b in blocks]
    if n_y:
        blocks.append(sparse.coo_matrix((link_v, (link_r, link_c)), shape=(n_link, n_var)).tocsr())
        lbs.append(np.full(n_link, -np.inf))
        ubs.append(np.zeros(n_link))
        blocks.append(sparse.coo_matrix((np.ones(len(cnt_r)), (cnt_r, cnt_c)), shape=(len(groups), n_var)).tocsr())
        lbs.append(np.full(len(groups), -np.inf))
        ubs.append(np.full(len(groups), float(max_types)))
    if paper_constraint:
        rows = paper_rows(problem)
        pr, pc = [], []
        for r, (idx, t) in enumerate(rows):
            for u in idx:
                pr.append(r)
                pc.append(var_of[(int(u), int(t))])
        blocks.append(sparse.coo_matrix((np.ones(len(pr)), (pr, pc)), shape=(len(rows), n_var)).tocsr())
        lbs.append(np.ones(len(rows)))
        ubs.append(np.full(len(rows), np.inf))

    A = sparse.vstack(blocks, format="csr")
    c = np.concatenate([cost / scale, np.zeros(n_y)])
    integrality = np.ones(n_var, dtype=np.int64)
    return MilpModel(
        c=c,
        integrality=integrality,
        constraints=[LinearConstraint(A, np.concatenate(lbs), np.concatenate(ubs))],
        var_unit=vu,
        var_type=vt,
        n_x=n_x,
        scale=scale,
    )


def _run(model: MilpModel, time_limit: float, mip_rel_gap: float) -> Any:
    opts = {"disp": False, "time_limit": max(float(time_limit), 0.01), "mip_rel_gap": float(mip_rel_gap)}
    return milp(
        model.c,
        integrality=model.integrality,
        bounds=Bounds(0.0, 1.0),
        constraints=model.constraints,
        options=opts,
    )


def _x_to_choice(model: MilpModel, x: np.ndarray, n_units: int) -> np.ndarray:
    """Per unit, the type with the largest x (exact 1 for a MILP solution)."""
    xs = x[: model.n_x]
    order = np.lexsort((-xs, model.var_unit))  # by unit, then x descending
    first = np.ones(order.size, dtype=bool)
    first[1:] = model.var_unit[order[1:]] != model.var_unit[order[:-1]]
    best = order[first]
    out = np.empty(n_units, dtype=np.int64)
    out[model.var_unit[best]] = model.var_type[best]
    return out


def solve_milp(
    problem: AllocationProblem,
    budget_bpw: float,
    max_types: int | None = 3,
    time_limit: float = 60.0,
    mip_rel_gap: float = 1e-4,
    paper_constraint: bool = False,
) -> Allocation | None:
    """The plain HiGHS MILP (no heuristic help): None if the time limit passed with no solution.

    status 'optimal' = HiGHS proved the gap <= mip_rel_gap; 'time_limit' = incumbent, see gap.
    """
    check_budget(problem, budget_bpw)
    t0 = time.perf_counter()
    model = build_model(problem, budget_bpw, max_types, paper_constraint)
    res = _run(model, max(0.5, time_limit - (time.perf_counter() - t0)), mip_rel_gap)
    if res.status == 2:
        raise_infeasible(problem, budget_bpw, max_types, paper_constraint)
    if res.x is None:
        return None
    choice = _x_to_choice(model, res.x, problem.n_units)
    if violations(problem, choice, budget_bpw, max_types, paper_constraint):
        # HiGHS feasibility tolerance can leave the budget a hair over: make it exact
        choice = greedy_repair(problem, choice, budget_bpw, max_types, paper_constraint)
    dual = getattr(res, "mip_dual_bound", None)
    bound = float(dual) * model.scale if dual is not None and np.isfinite(dual) else float("nan")
    return make_allocation(
        problem, choice, strategy="gemq", budget_bpw=budget_bpw,
        status="optimal" if res.status == 0 else "time_limit",
        gap=relative_gap(problem.cost_of(choice), bound), bound=bound,
        seconds=time.perf_counter() - t0, method="milp", max_types=max_types,
    )
