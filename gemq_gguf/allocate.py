"""GEMQ bit allocation: choose one ggml quant type per unit (expert, expert-projection or tensor).

Pure math, no model: the caller supplies a cost matrix (predicted loss increase of quantizing
each unit to each type, DESIGN.md §5) and the sizes; we solve one global integer program with
HiGHS (`scipy.optimize.milp`) under an average bits-per-weight budget, counted in real ggml bpw.
Baselines (uniform, layerwise) go through the same interface so reports compare like with like.
"""
from __future__ import annotations

import heapq
import itertools
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from gemq_gguf.errors import GemqError

UnitKey = tuple[int, int | None, str | None]
"""(layer, expert, proj): proj None = whole expert; expert None = all experts of a layer-projection."""

# Real ggml bits per weight (block bytes * 8 / block size), so budgets match file sizes.
GGML_BPW: dict[str, float] = {
    "IQ1_S": 1.5625,
    "IQ1_M": 1.75,
    "IQ2_XXS": 2.0625,
    "IQ2_XS": 2.3125,
    "IQ2_S": 2.5625,
    "Q2_K": 2.625,
    "IQ3_XXS": 3.0625,
    "IQ3_S": 3.4375,
    "Q3_K": 3.4375,
    "IQ4_XS": 4.25,
    "IQ4_NL": 4.5,
    "Q4_0": 4.5,
    "Q4_K": 4.5,
    "Q4_1": 5.0,
    "Q5_0": 5.5,
    "Q5_K": 5.5,
    "Q5_1": 6.0,
    "Q6_K": 6.5625,
    "Q8_0": 8.5,
    "F16": 16.0,
    "BF16": 16.0,
    "F32": 32.0,
}

DEFAULT_TYPES: tuple[str, ...] = ("IQ2_XXS", "Q2_K", "IQ3_XXS", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K")
STRATEGIES: tuple[str, ...] = ("gemq", "layerwise", "uniform")
PROJS: tuple[str, ...] = ("gate", "up", "down", "gate_up")


def bpw_of(types: Sequence[str]) -> np.ndarray:
    """Real ggml bpw for each type name; unknown names are a user error, not a KeyError."""
    missing = [t for t in types if t.upper() not in GGML_BPW]
    if missing:
        raise GemqError(
            f"Unknown ggml type(s) {missing} in the candidate list.",
            f"use names from: {', '.join(GGML_BPW)}.",
        )
    return np.array([GGML_BPW[t.upper()] for t in types], dtype=np.float64)


def default_groups(units: Sequence[UnitKey]) -> list[np.ndarray]:
    """Units sharing one GGUF tensor: same (layer, proj). Expert granularity groups a whole layer."""
    by_key: dict[tuple[int, str | None], list[int]] = {}
    for i, (layer, _expert, proj) in enumerate(units):
        by_key.setdefault((layer, proj), []).append(i)
    return [np.asarray(v, dtype=np.int64) for v in by_key.values()]


def granularity(units: Sequence[UnitKey]) -> str:
    """'expert', 'expert-proj' or 'tensor', read off the unit keys."""
    if all(u[2] is None for u in units):
        return "expert"
    if all(u[1] is None for u in units):
        return "tensor"
    return "expert-proj"


def unit_label(unit: UnitKey) -> str:
    """Short human name for a unit, e.g. 'L3.E17.down' or 'L3.down'."""
    layer, expert, proj = unit
    parts = [f"L{layer}"]
    if expert is not None:
        parts.append(f"E{expert}")
    if proj is not None:
        parts.append(str(proj))
    return ".".join(parts)


@dataclass(frozen=True, eq=False)
class AllocationProblem:
    """Everything the solver needs: per-(unit, type) cost and bits, plus which units share a tensor.

    cost[u, t] = predicted loss increase (>= 0, np.inf = type not allowed for this unit).
    bits[u, t] defaults to params[u] * bpw[t]; pass it when a unit mixes rows of different widths.
    groups: unit indices that live in one (layer, projection) tensor, for the max-types constraint.
    """

    units: list[UnitKey]
    types: list[str]
    cost: np.ndarray
    params: np.ndarray
    bpw: np.ndarray
    bits: np.ndarray | None = None
    groups: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        u, t = len(self.units), len(self.types)
        cost = np.asarray(self.cost, dtype=np.float64)
        if cost.shape != (u, t):
            raise ValueError(f"cost has shape {cost.shape}, expected ({u}, {t})")
        if np.isnan(cost).any() or (cost < 0).any():
            raise ValueError("cost must be >= 0 (np.inf for a disallowed type), without NaN")
        params = np.asarray(self.params, dtype=np.float64)
        bpw = np.asarray(self.bpw, dtype=np.float64)
        if params.shape != (u,) or (params <= 0).any():
            raise ValueError("params must have one positive entry per unit")
        if bpw.shape != (t,) or (bpw <= 0).any():
            raise ValueError("bpw must have one positive entry per type")
        if self.bits is not None:
            bits = np.asarray(self.bits, dtype=np.float64)
            if bits.shape != (u, t) or not np.isfinite(bits).all() or (bits <= 0).any():
                raise ValueError(f"bits must be finite, positive, of shape ({u}, {t})")
            object.__setattr__(self, "bits", bits)
        if len(set(self.types)) != t:
            raise ValueError("types must be distinct")
        allowed_any = np.isfinite(cost).any(axis=1)
        if not allowed_any.all():
            bad = [unit_label(self.units[i]) for i in np.flatnonzero(~allowed_any)[:5]]
            raise GemqError(
                f"Units {bad} have no allowed quant type (every cost is inf).",
                "add a type their shape supports (e.g. Q8_0 or Q4_0) to --types.",
            )
        if len(set(map(tuple, self.units))) != u:
            raise ValueError("units must be distinct")
        groups = [np.asarray(g, dtype=np.int64) for g in self.groups]
        seen = np.zeros(u, dtype=np.int64)
        for g in groups:
            if g.ndim != 1 or (g.size and (g.min() < 0 or g.max() >= u)):
                raise ValueError("groups must be 1-D arrays of unit indices")
            np.add.at(seen, g, 1)
        if (seen > 1).any():
            raise ValueError("groups must be disjoint (a unit lives in one (layer, projection) tensor)")
        object.__setattr__(self, "units", [tuple(x) for x in self.units])
        object.__setattr__(self, "types", list(self.types))
        object.__setattr__(self, "cost", cost)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "bpw", bpw)
        object.__setattr__(self, "groups", groups)

    @classmethod
    def build(
        cls,
        units: Sequence[UnitKey],
        types: Sequence[str],
        cost: np.ndarray,
        params: np.ndarray,
        bits: np.ndarray | None = None,
        groups: list[np.ndarray] | None = None,
    ) -> "AllocationProblem":
        """Convenience: bpw from GGML_BPW and groups from (layer, proj) when not given."""
        return cls(
            units=list(units),
            types=list(types),
            cost=cost,
            params=params,
            bpw=bpw_of(types),
            bits=bits,
            groups=default_groups(units) if groups is None else groups,
        )

    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def n_types(self) -> int:
        return len(self.types)

    @property
    def bit_matrix(self) -> np.ndarray:
        """Exact bits for every (unit, type)."""
        if self.bits is not None:
            return self.bits
        return self.params[:, None] * self.bpw[None, :]

    @property
    def total_params(self) -> float:
        return float(self.params.sum())

    @property
    def allowed(self) -> np.ndarray:
        return np.isfinite(self.cost)

    @property
    def layers(self) -> np.ndarray:
        return np.array([u[0] for u in self.units], dtype=np.int64)

    def bpw_range(self) -> tuple[float, float]:
        """Lowest and highest reachable average bpw (ignoring max-types, which never binds at the ends)."""
        b = self.bit_matrix
        allowed = self.allowed
        lo = np.where(allowed, b, np.inf).min(axis=1).sum()
        hi = np.where(allowed, b, -np.inf).max(axis=1).sum()
        return float(lo / self.total_params), float(hi / self.total_params)

    def subset(self, idx: np.ndarray) -> "AllocationProblem":
        """The problem restricted to some units (groups re-indexed, empty ones dropped)."""
        idx = np.asarray(idx, dtype=np.int64)
        remap = np.full(self.n_units, -1, dtype=np.int64)
        remap[idx] = np.arange(idx.size)
        groups = []
        for g in self.groups:
            m = remap[g]
            m = m[m >= 0]
            if m.size:
                groups.append(m)
        return AllocationProblem(
            units=[self.units[i] for i in idx],
            types=self.types,
            cost=self.cost[idx],
            params=self.params[idx],
            bpw=self.bpw,
            bits=None if self.bits is None else self.bits[idx],
            groups=groups,
        )


def coarsen(
    problem: AllocationProblem, key: Callable[[UnitKey], UnitKey]
) -> tuple[AllocationProblem, list[np.ndarray]]:
    """Merge units that map to the same key: costs, params and bits add (the Fisher cost is additive
    over experts and projections). Returns the merged problem and, per new unit, the old indices.

    A merged (unit, type) is allowed only if every member allows it. Groups are rebuilt by
    (layer, proj) of the new keys.
    """
    members: dict[UnitKey, list[int]] = {}
    for i, u in enumerate(problem.units):
        members.setdefault(tuple(key(u)), []).append(i)
    new_units = list(members)
    idx = [np.asarray(v, dtype=np.int64) for v in members.values()]
    cost = np.stack([problem.cost[m].sum(axis=0) for m in idx])
    params = np.array([problem.params[m].sum() for m in idx])
    bits = np.stack([problem.bit_matrix[m].sum(axis=0) for m in idx])
    return (
        AllocationProblem(
            units=new_units, types=problem.types, cost=cost, params=params, bpw=problem.bpw,
            bits=bits, groups=default_groups(new_units),
        ),
        idx,
    )


def to_tensor_granularity(problem: AllocationProblem) -> tuple[AllocationProblem, list[np.ndarray]]:
    """One unit per (layer, projection): the stock-llama.cpp mode (solve_tensor = gemq on this)."""
    return coarsen(problem, lambda u: (u[0], None, u[2]))


def to_expert_granularity(problem: AllocationProblem) -> tuple[AllocationProblem, list[np.ndarray]]:
    """One unit per expert (gate/up/down share a type), from expert-projection costs."""
    return coarsen(problem, lambda u: (u[0], u[1], None))


def expand(alloc_choice: Sequence[str], members: list[np.ndarray], n_units: int) -> list[str]:
    """Per original unit, the type its merged unit got (for the writer, which works per tensor row)."""
    out: list[str] = [""] * n_units
    for t, m in zip(alloc_choice, members):
        for i in m:
            out[int(i)] = t
    return out


@dataclass(frozen=True, eq=False)
class Allocation:
    """A solved plan: one type per unit, with the numbers a report and the GGUF writer need.

    Self-contained (no reference to the problem) so it round-trips through JSON.
    gap: relative distance to the best lower bound on cost found (0 = proven optimal;
    nan = no bound, e.g. uniform).
    """

    strategy: str
    budget_bpw: float
    units: list[UnitKey]
    types: list[str]
    type_index: np.ndarray
    unit_cost: np.ndarray
    unit_bits: np.ndarray
    unit_params: np.ndarray
    status: str
    gap: float
    bound: float
    seconds: float
    method: str
    max_types: int | None = None
    type_bpw: np.ndarray | None = None

    @property
    def choice(self) -> list[str]:
        """Type name per unit, aligned with `units`."""
        return [self.types[i] for i in self.type_index]

    def plan(self) -> dict[UnitKey, str]:
        """unit key -> ggml type name: what the GGUF writer consumes."""
        return dict(zip(self.units, self.choice))

    @property
    def total_cost(self) -> float:
        """Predicted loss increase: the sum of the chosen units' costs."""
        return float(self.unit_cost.sum())

    @property
    def bits_used(self) -> float:
        return float(self.unit_bits.sum())

    @property
    def total_params(self) -> float:
        return float(self.unit_params.sum())

    @property
    def bpw(self) -> float:
        return self.bits_used / self.total_params

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "budget_bpw": self.budget_bpw,
            "bpw": self.bpw,
            "bits_used": self.bits_used,
            "bits_budget": self.budget_bpw * self.total_params,
            "total_params": self.total_params,
            "predicted_loss_increase": self.total_cost,
            "solver": {
                "status": self.status,
                "method": self.method,
                "gap": None if np.isnan(self.gap) else self.gap,
                "bound": None if np.isnan(self.bound) else self.bound,
                "seconds": self.seconds,
                "max_types": self.max_types,
            },
            "types": list(self.types),
            "type_bpw": None if self.type_bpw is None else [float(b) for b in self.type_bpw],
            "units": [
                {
                    "layer": int(u[0]),
                    "expert": None if u[1] is None else int(u[1]),
                    "proj": u[2],
                    "type": self.types[int(ti)],
                    "cost": float(c),
                    "bits": float(b),
                    "params": float(p),
                }
                for u, ti, c, b, p in zip(
                    self.units, self.type_index, self.unit_cost, self.unit_bits, self.unit_params
                )
            ],
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Allocation":
        types = list(d["types"])
        pos = {t: i for i, t in enumerate(types)}
        rows = d["units"]
        s = d["solver"]
        return cls(
            strategy=d["strategy"],
            budget_bpw=float(d["budget_bpw"]),
            units=[(int(r["layer"]), r["expert"], r["proj"]) for r in rows],
            types=types,
            type_index=np.array([pos[r["type"]] for r in rows], dtype=np.int64),
            unit_cost=np.array([r["cost"] for r in rows], dtype=np.float64),
            unit_bits=np.array([r["bits"] for r in rows], dtype=np.float64),
            unit_params=np.array([r["params"] for r in rows], dtype=np.float64),
            status=s["status"],
            gap=np.nan if s["gap"] is None else float(s["gap"]),
            bound=np.nan if s["bound"] is None else float(s["bound"]),
            seconds=float(s["seconds"]),
            method=s["method"],
            max_types=s.get("max_types"),
            type_bpw=None if d.get("type_bpw") is None else np.asarray(d["type_bpw"], dtype=np.float64),
        )

    @classmethod
    def from_json(cls, text: str) -> "Allocation":
        return cls.from_dict(json.loads(text))


def make_allocation(
    problem: AllocationProblem,
    type_index: np.ndarray,
    *,
    strategy: str,
    budget_bpw: float,
    status: str,
    gap: float,
    bound: float,
    seconds: float,
    method: str,
    max_types: int | None,
) -> Allocation:
    """Package a choice vector with its exact costs and bits."""
    ti = np.asarray(type_index, dtype=np.int64)
    rows = np.arange(problem.n_units)
    return Allocation(
        strategy=strategy,
        budget_bpw=float(budget_bpw),
        units=list(problem.units),
        types=list(problem.types),
        type_index=ti,
        unit_cost=problem.cost[rows, ti].copy(),
        unit_bits=problem.bit_matrix[rows, ti].copy(),
        unit_params=problem.params.copy(),
        status=status,
        gap=float(gap),
        bound=float(bound),
        seconds=float(seconds),
        method=method,
        max_types=max_types,
        type_bpw=problem.bpw.copy(),
    )


# ----------------------------------------------------------------------------- checks


def check_budget(problem: AllocationProblem, budget_bpw: float) -> None:
    """Fail early, with the reachable range, when no choice fits the budget."""
    lo, hi = problem.bpw_range()
    if not np.isfinite(budget_bpw) or budget_bpw < lo * (1 - 1e-12):
        raise GemqError(
            f"Budget {budget_bpw:g} bpw is below the lowest reachable average "
            f"({lo:.4f} bpw; the highest is {hi:.4f} bpw) with types {', '.join(problem.types)}.",
            f"use --budget between {lo:.4f} and {hi:.4f}, or add a lower-bit type to --types.",
        )


def cap_bits(problem: AllocationProblem, budget_bpw: float) -> float:
    return float(budget_bpw) * problem.total_params


def constrained_groups(problem: AllocationProblem, max_types: int | None) -> list[np.ndarray]:
    """Only groups that could exceed max_types need the extra variables."""
    if max_types is None:
        return []
    allowed = problem.allowed
    return [g for g in problem.groups if g.size and allowed[g].any(axis=0).sum() > max_types]


def top_types(problem: AllocationProblem) -> list[int]:
    """Indices of the two highest-bpw types (the paper's 'keep some experts wide' constraint)."""
    order = np.argsort(-problem.bpw, kind="stable")
    return [int(i) for i in order[:2]]


def paper_rows(problem: AllocationProblem) -> list[tuple[np.ndarray, int]]:
    """(units of a layer, type) pairs: each layer keeps >= 1 unit at each of the two widest types."""
    layers = problem.layers
    allowed = problem.allowed
    out = []
    for layer in np.unique(layers):
        idx = np.flatnonzero(layers == layer)
        for t in top_types(problem):
            ok = idx[allowed[idx, t]]
            if ok.size:
                out.append((ok, t))
    return out


def violations(
    problem: AllocationProblem,
    type_index: np.ndarray,
    budget_bpw: float,
    max_types: int | None,
    paper_constraint: bool = False,
    rtol: float = 1e-9,
) -> list[str]:
    """Human-readable list of broken constraints (empty = feasible). Used by tests and repair."""
    out = []
    rows = np.arange(problem.n_units)
    if not problem.allowed[rows, type_index].all():
        out.append("disallowed type chosen")
    bits = problem.bit_matrix[rows, type_index].sum()
    cap = cap_bits(problem, budget_bpw)
    if bits > cap * (1 + rtol):
        out.append(f"bits {bits:.6g} > budget {cap:.6g}")
    if max_types is not None:
        for g in problem.groups:
            n = np.unique(type_index[g]).size
            if n > max_types:
                out.append(f"group of {unit_label(problem.units[g[0]])} uses {n} types")
    if paper_constraint:
        for idx, t in paper_rows(problem):
            if not (type_index[idx] == t).any():
                out.append(f"layer {problem.units[idx[0]][0]} has no unit at {problem.types[t]}")
    return out


# ----------------------------------------------------------------------------- MILP model


@dataclass(frozen=True)
class _Model:
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
    integer: bool = True,
) -> _Model:
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
    integrality = np.full(n_var, 1 if integer else 0, dtype=np.int64)
    return _Model(
        c=c,
        integrality=integrality,
        constraints=[LinearConstraint(A, np.concatenate(lbs), np.concatenate(ubs))],
        var_unit=vu,
        var_type=vt,
        n_x=n_x,
        scale=scale,
    )


def _run(model: _Model, time_limit: float, mip_rel_gap: float) -> Any:
    opts: dict[str, Any] = {"disp": False, "time_limit": max(float(time_limit), 0.01)}
    if model.integrality.any():
        opts["mip_rel_gap"] = float(mip_rel_gap)
    return milp(
        model.c,
        integrality=model.integrality,
        bounds=Bounds(0.0, 1.0),
        constraints=model.constraints,
        options=opts,
    )


def _x_to_choice(model: _Model, x: np.ndarray, n_units: int) -> np.ndarray:
    """Per unit, the type with the largest x (exact 1 for a MILP solution)."""
    xs = x[: model.n_x]
    order = np.lexsort((-xs, model.var_unit))  # by unit, then x descending
    first = np.ones(order.size, dtype=bool)
    first[1:] = model.var_unit[order[1:]] != model.var_unit[order[:-1]]
    best = order[first]
    out = np.empty(n_units, dtype=np.int64)
    out[model.var_unit[best]] = model.var_type[best]
    return out


def _gap(cost: float, bound: float) -> float:
    if not np.isfinite(bound):
        return float("nan")
    if cost <= 0:
        return 0.0
    return max(0.0, (cost - bound) / cost)


# ----------------------------------------------------------------------------- greedy repair


class _State:
    """Mutable assignment with per-group type counts, so moves can be checked for max-types in O(1).

    Groups are disjoint (validated by AllocationProblem), so each unit has at most one group.
    """

    def __init__(
        self,
        problem: AllocationProblem,
        choice: np.ndarray,
        max_types: int | None,
        locked: set[int] | None = None,
    ) -> None:
        self.p = problem
        self.choice = np.array(choice, dtype=np.int64)
        self.max_types = max_types
        self.bits = problem.bit_matrix
        self.cost = problem.cost
        self.allowed = problem.allowed
        self.locked = locked or set()
        self.version = np.zeros(problem.n_units, dtype=np.int64)
        groups = problem.groups if max_types is not None else []
        self.group = np.full(problem.n_units, -1, dtype=np.int64)
        for gi, g in enumerate(groups):
            self.group[g] = gi
        self.counts = np.zeros((len(groups), problem.n_types), dtype=np.int64)
        m = self.group >= 0
        np.add.at(self.counts, (self.group[m], self.choice[m]), 1)
        self.n_used = (self.counts > 0).sum(axis=1)
        rows = np.arange(problem.n_units)
        self.total_bits = float(self.bits[rows, self.choice].sum())

    def can_move(self, u: int, t: int) -> bool:
        if u in self.locked or not self.allowed[u, t]:
            return False
        g = self.group[u]
        if g < 0 or self.max_types is None or self.counts[g, t] > 0:
            return True
        old = self.choice[u]
        n = self.n_used[g] - (1 if self.counts[g, old] == 1 else 0)
        return bool(n + 1 <= self.max_types)

    def valid_mask(self) -> np.ndarray:
        """can_move for every (unit, type) at once."""
        ok = self.allowed.copy()
        if self.locked:
            ok[list(self.locked)] = False
        m = self.group >= 0
        if self.max_types is None or not m.any():
            return ok
        g = self.group[m]
        present = self.counts[g] > 0  # (n, T)
        alone = self.counts[g, self.choice[m]] == 1
        room = (self.n_used[g] - alone.astype(np.int64) + 1) <= self.max_types
        ok[m] &= present | room[:, None]
        return ok

    def move(self, u: int, t: int) -> None:
        old = int(self.choice[u])
        g = self.group[u]
        if g >= 0:
            self.counts[g, old] -= 1
            if self.counts[g, old] == 0:
                self.n_used[g] -= 1
            if self.counts[g, t] == 0:
                self.n_used[g] += 1
            self.counts[g, t] += 1
        self.total_bits += float(self.bits[u, t] - self.bits[u, old])
        self.choice[u] = t
        self.version[u] += 1


def _down_moves(s: _State, u: int) -> list[tuple[float, int, int, int]]:
    """Moves that save bits, keyed by cost increase per bit saved (cheapest first)."""
    cur = int(s.choice[u])
    b0, c0 = s.bits[u, cur], s.cost[u, cur]
    out = []
    for t in range(s.p.n_types):
        db = b0 - s.bits[u, t]
        if db > 0 and s.allowed[u, t]:
            out.append(((s.cost[u, t] - c0) / db, u, t, int(s.version[u])))
    return out


def _up_moves(s: _State, u: int) -> list[tuple[float, int, int, int]]:
    """Moves that lower cost for more bits, keyed by -(cost saved per bit spent)."""
    cur = int(s.choice[u])
    b0, c0 = s.bits[u, cur], s.cost[u, cur]
    out = []
    for t in range(s.p.n_types):
        dc = c0 - s.cost[u, t]
        if dc > 0 and s.allowed[u, t]:
            db = s.bits[u, t] - b0
            key = -dc / db if db > 0 else -np.inf
            out.append((key, u, t, int(s.version[u])))
    return out


def _deltas(s: _State) -> tuple[np.ndarray, np.ndarray]:
    """Cost and bits change of moving every unit to every type (inf cost where disallowed)."""
    rows = np.arange(s.p.n_units)
    dc = s.cost - s.cost[rows, s.choice][:, None]
    db = s.bits - s.bits[rows, s.choice][:, None]
    return dc, db


def _heap_from(key: np.ndarray, mask: np.ndarray, s: _State) -> list[tuple[float, int, int, int]]:
    uu, tt = np.nonzero(mask)
    heap = list(zip(key[uu, tt].tolist(), uu.tolist(), tt.tolist(), s.version[uu].tolist()))
    heapq.heapify(heap)
    return heap


def _repair_down(s: _State, cap: float) -> bool:
    """Cheapest-per-bit downgrades until the budget holds; False if stuck."""
    if s.total_bits <= cap:
        return True
    dc, db = _deltas(s)
    mask = s.valid_mask() & (db < 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        heap = _heap_from(np.where(mask, dc / -db, 0.0), mask, s)
    while s.total_bits > cap and heap:
        _, u, t, ver = heapq.heappop(heap)
        if ver != s.version[u] or not s.can_move(u, t):
            continue
        s.move(u, t)
        for m in _down_moves(s, u):
            heapq.heappush(heap, m)
    return s.total_bits <= cap


def _fill_up(s: _State, cap: float, rounds: int = 64) -> None:
    """Spend leftover bits on the best cost-saved-per-bit upgrades that still fit.

    Only moves that fit the current slack are queued, and the queue is rebuilt whenever the slack
    halves, so large instances do not pop hundreds of thousands of moves that can no longer fit.
    """
    for _ in range(rounds):
        slack0 = cap - s.total_bits
        dc, db = _deltas(s)
        mask = s.valid_mask() & (dc < 0) & (db <= slack0)
        if not mask.any():
            return
        with np.errstate(divide="ignore", invalid="ignore"):
            key = np.where(db > 0, dc / np.where(db > 0, db, 1.0), -np.inf)
        heap = _heap_from(key, mask, s)
        moved = False
        while heap:
            _, u, t, ver = heapq.heappop(heap)
            if ver != s.version[u]:
                continue
            step = s.bits[u, t] - s.bits[u, int(s.choice[u])]
            if s.total_bits + step > cap or not s.can_move(u, t):
                continue
            s.move(u, t)
            moved = True
            for m in _up_moves(s, u):
                if m[0] == -np.inf or s.bits[m[1], m[2]] - s.bits[u, t] <= cap - s.total_bits:
                    heapq.heappush(heap, m)
            if cap - s.total_bits < 0.5 * slack0:
                break  # rebuild a smaller queue
        if not moved:
            return


def _enforce_max_types(problem: AllocationProblem, choice: np.ndarray, max_types: int) -> np.ndarray:
    """For each group over max_types, keep the type subset that costs least without adding bits."""
    choice = choice.copy()
    bits, cost, allowed = problem.bit_matrix, problem.cost, problem.allowed
    for g in problem.groups:
        used = np.unique(choice[g])
        if used.size <= max_types:
            continue
        cur_bits = bits[g, choice[g]]
        best: tuple[float, np.ndarray] | None = None
        for keep in itertools.combinations(used.tolist(), max_types):
            k = np.array(keep)
            b = bits[np.ix_(g, k)]
            c = np.where(allowed[np.ix_(g, k)], cost[np.ix_(g, k)], np.inf)
            ok = b <= cur_bits[:, None] * (1 + 1e-12)
            c_ok = np.where(ok, c, np.inf)
            pick = c_ok.argmin(axis=1)
            # no kept type at or below the current bits: take the smallest kept one
            none = ~np.isfinite(c_ok[np.arange(g.size), pick])
            pick[none] = np.where(np.isfinite(c[none]), b[none], np.inf).argmin(axis=1)
            total = float(c[np.arange(g.size), pick].sum())
            if best is None or total < best[0]:
                best = (total, k[pick])
        assert best is not None
        choice[g] = best[1]
    return choice


def _min_bits_choice(problem: AllocationProblem) -> np.ndarray:
    """Lowest-bit allowed type per unit (cheapest cost among ties): the always-feasible start."""
    b = np.where(problem.allowed, problem.bit_matrix, np.inf)
    lo = b.min(axis=1, keepdims=True)
    c = np.where(b <= lo * (1 + 1e-12), problem.cost, np.inf)
    return c.argmin(axis=1)


def greedy_repair(
    problem: AllocationProblem,
    choice: np.ndarray,
    budget_bpw: float,
    max_types: int | None,
    paper_constraint: bool = False,
) -> np.ndarray:
    """Turn a rounded LP point into a feasible choice: max-types, paper rows, budget, then fill slack."""
    cap = cap_bits(problem, budget_bpw)
    if max_types is not None:
        choice = _enforce_max_types(problem, choice, max_types)
    locked: set[int] = set()
    if paper_constraint:
        for idx, t in paper_rows(problem):
            if (choice[idx] == t).any():
                locked.add(int(idx[choice[idx] == t][0]))
                continue
            delta = problem.cost[idx, t] - problem.cost[idx, choice[idx]]
            u = int(idx[np.argmin(delta)])
            choice = choice.copy()
            choice[u] = t
            locked.add(u)
    s = _State(problem, choice, max_types, locked)
    if not _repair_down(s, cap):
        # stuck (max-types or locked units): restart from the narrowest types, always in budget;
        # paper rows may then fail, which the caller's violations() check catches
        s = _State(problem, _min_bits_choice(problem), max_types, None)
    _fill_up(s, cap)
    return s.choice


# ----------------------------------------------------------------------------- solvers


def _type_subsets(n_types: int, k: int) -> np.ndarray:
    """All k-subsets of the types (smaller subsets are dominated: a min over more types is lower)."""
    return np.array(list(itertools.combinations(range(n_types), k)), dtype=np.int64).reshape(-1, k)


@dataclass(frozen=True)
class _Relaxation:
    """Lagrangian relaxation of the budget row: for a price per bit, each unit (or each tensor group,
    choosing its best <= max_types type subset) minimizes cost + price*bits independently."""

    C: np.ndarray  # scaled cost, inf where disallowed
    B: np.ndarray  # bits / total params
    free: np.ndarray  # units in no constrained group
    gidx: np.ndarray  # (G, n) unit indices of constrained groups, -1 padding
    subs: np.ndarray  # (K, k) type subsets
    scale: float

    @classmethod
    def build(cls, problem: AllocationProblem, max_types: int | None) -> "_Relaxation":
        allowed = problem.allowed
        fin = problem.cost[allowed]
        scale = float(fin.max()) if fin.size and fin.max() > 0 else 1.0
        C = np.where(allowed, problem.cost / scale, np.inf)
        B = problem.bit_matrix / problem.total_params
        groups = constrained_groups(problem, max_types)
        in_group = np.zeros(problem.n_units, dtype=bool)
        n = max((g.size for g in groups), default=0)
        gidx = np.full((len(groups), n), -1, dtype=np.int64)
        for i, g in enumerate(groups):
            gidx[i, : g.size] = g
            in_group[g] = True
        k = min(max_types or problem.n_types, problem.n_types)
        return cls(C, B, np.flatnonzero(~in_group), gidx, _type_subsets(problem.n_types, k), scale)

    def evaluate(self, lam: float) -> tuple[np.ndarray, float, float]:
        """Minimizer at price lam: (choice, dual value L(lam) + lam*cap, scaled bits used)."""
        V = self.C + lam * self.B
        choice = np.argmin(V, axis=1)
        rows = np.arange(V.shape[0])
        value = float(V[self.free, choice[self.free]].sum())
        if self.gidx.size:
            pad = self.gidx < 0
            Vg = V[np.where(pad, 0, self.gidx)]  # (G, n, T)
            Vg[pad] = 0.0
            M = Vg[:, :, self.subs[:, 0]]  # (G, n, K): min over each subset, column by column
            for j in range(1, self.subs.shape[1]):
                np.minimum(M, Vg[:, :, self.subs[:, j]], out=M)
            tot = M.sum(axis=1)  # (G, K)
            best = tot.argmin(axis=1)
            value += float(tot[np.arange(tot.shape[0]), best].sum())
            S = self.subs[best]  # (G, k)
            inner = np.take_along_axis(Vg, S[:, None, :].repeat(Vg.shape[1], axis=1), axis=2)
            pick = np.take_along_axis(S[:, None, :].repeat(Vg.shape[1], axis=1), inner.argmin(axis=2)[..., None], axis=2)[..., 0]
            choice[self.gidx[~pad]] = pick[~pad]
        return choice, value, float(self.B[rows, choice].sum())


def _forced_bounds(rel: _Relaxation, lam: float, budget_bpw: float) -> np.ndarray:
    """For every (unit, type): the Lagrangian lower bound on total cost (caller's units) when that
    unit is forced to that type. Used to fix variables: above the best known cost = never optimal."""
    V = rel.C + lam * rel.B
    U, T = V.shape
    vmin = V.min(axis=1)
    total = float(vmin[rel.free].sum()) - lam * float(budget_bpw)
    out = np.full((U, T), np.inf)
    if rel.gidx.size:
        pad = rel.gidx < 0
        Vg = V[np.where(pad, 0, rel.gidx)]
        Vg[pad] = 0.0
        M = Vg[:, :, rel.subs[:, 0]]
        for j in range(1, rel.subs.shape[1]):
            np.minimum(M, Vg[:, :, rel.subs[:, j]], out=M)
        tot = M.sum(axis=1)  # (G, K)
        gbest = tot.min(axis=1)  # (G,)
        total += float(gbest.sum())
        with np.errstate(invalid="ignore"):
            A = np.where(np.isfinite(M), tot[:, None, :] - M, np.inf)  # group value without unit i
        contains = np.zeros((rel.subs.shape[0], T), dtype=bool)
        contains[np.arange(rel.subs.shape[0])[:, None], rel.subs] = True
        real = rel.gidx[~pad]
        for t in range(T):
            best_t = np.where(contains[None, None, :, t], A, np.inf).min(axis=-1)  # (G, n)
            val = total - gbest[:, None] + best_t + Vg[:, :, t]
            out[real, t] = val[~pad]
    out[rel.free] = total + V[rel.free] - vmin[rel.free, None]
    return out * rel.scale


@dataclass(frozen=True)
class _Lagrangian:
    under: np.ndarray
    over: np.ndarray | None
    bound: float
    lam: float
    rel: _Relaxation


def lagrangian_allocation(
    problem: AllocationProblem,
    budget_bpw: float,
    max_types: int | None,
    iters: int = 60,
) -> _Lagrangian:
    """Minimizers of the Lagrangian on both sides of the budget, and the best lower bound on cost.

    Without max-types this is the LP relaxation solved exactly through its dual (the one-type-per-unit
    polytope is integral); with max-types it is at least as strong. Bisection on the bit price.
    Gives the cheapest budget-feasible minimizer, the tightest over-budget one (or None), the bound
    in the caller's cost units (nan if none was finite) and the price that gave it.
    """
    rel = _Relaxation.build(problem, max_types)
    cap = float(budget_bpw) * (1 + 1e-12)
    rows = np.arange(problem.n_units)
    best_bound, best_lam = -np.inf, 0.0
    best: tuple[float, np.ndarray] | None = None
    over: tuple[float, np.ndarray] | None = None

    def visit(lam: float) -> bool:
        nonlocal best_bound, best_lam, best, over
        choice, value, used = rel.evaluate(lam)
        if np.isfinite(value) and value - lam * float(budget_bpw) > best_bound:
            best_bound, best_lam = value - lam * float(budget_bpw), lam
        if used <= cap:
            c = float(problem.cost[rows, choice].sum())
            if best is None or c < best[0]:
                best = (c, choice)
            return True
        if over is None or used < over[0]:
            over = (used, choice)
        return False

    lo, hi = 0.0, 1.0
    if not visit(0.0):
        for _ in range(200):
            if visit(hi):
                break
            lo, hi = hi, hi * 2.0
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            if visit(mid):
                hi = mid
            else:
                lo = mid
            if hi - lo <= 1e-7 * hi:
                break
    bound = best_bound * rel.scale if np.isfinite(best_bound) else float("nan")
    feasible = _min_bits_choice(problem) if best is None else best[1]
    return _Lagrangian(feasible, None if over is None else over[1], bound, best_lam, rel)


def _lp_round(
    problem: AllocationProblem, budget_bpw: float, max_types: int | None, paper_constraint: bool
) -> tuple[Allocation, _Lagrangian]:
    t0 = time.perf_counter()
    lag = lagrangian_allocation(problem, budget_bpw, max_types)
    rows = np.arange(problem.n_units)
    candidates = []
    for start in (lag.under, lag.over):
        if start is None:
            continue
        c = greedy_repair(problem, start, budget_bpw, max_types, paper_constraint)
        if not violations(problem, c, budget_bpw, max_types, paper_constraint):
            candidates.append(c)
    if not candidates:
        raise GemqError(
            f"The fast solver found no allocation meeting {budget_bpw:g} bpw with these constraints.",
            "use the MILP (method 'milp' / 'auto'), raise --budget or --max-types.",
        )
    choice = min(candidates, key=lambda c: problem.cost[rows, c].sum())
    total = float(problem.cost[rows, choice].sum())
    alloc = make_allocation(
        problem, choice, strategy="gemq", budget_bpw=budget_bpw,
        status="heuristic", gap=_gap(total, lag.bound), bound=lag.bound,
        seconds=time.perf_counter() - t0, method="lp-round", max_types=max_types,
    )
    return alloc, lag


def solve_lp_round(
    problem: AllocationProblem,
    budget_bpw: float,
    max_types: int | None = 3,
    time_limit: float = 60.0,
    paper_constraint: bool = False,
) -> Allocation:
    """Relaxation + rounding + greedy repair: seconds at any size, with a proven gap.

    The budget row is relaxed with a bit price (= the LP relaxation's dual); the minimizers just
    under and just over the budget are repaired (paper rows, budget) and topped up greedily with
    the leftover bits; the cheaper one wins. time_limit is unused (kept for a uniform signature).
    """
    check_budget(problem, budget_bpw)
    return _lp_round(problem, budget_bpw, max_types, paper_constraint)[0]


def reduce_by_bound(problem: AllocationProblem, forced: np.ndarray, upper: float, keep: np.ndarray) -> AllocationProblem:
    """Drop (unit, type) pairs whose forced lower bound exceeds the best known cost: no solution
    cheaper than `upper` uses them, so the MILP over the rest is exact. `keep` = the incumbent."""
    slack = 1e-9 * abs(upper) + 1e-300
    allowed = problem.allowed & (forced <= upper + slack)
    allowed[np.arange(problem.n_units), keep] = True
    return replace(problem, cost=np.where(allowed, problem.cost, np.inf))


def _raise_infeasible(problem: AllocationProblem, budget_bpw: float, max_types: int | None, paper: bool) -> None:
    lo, hi = problem.bpw_range()
    extra = []
    if max_types is not None:
        extra.append(f"at most {max_types} types per tensor")
    if paper:
        extra.append("the paper constraint (each layer keeps units at the two widest types)")
    raise GemqError(
        f"No allocation meets {budget_bpw:g} bpw with {' and '.join(extra) or 'these types'} "
        f"(reachable range without them: {lo:.4f}-{hi:.4f} bpw).",
        "raise --budget, raise --max-types, or drop the paper constraint.",
    )


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
    model = build_model(problem, budget_bpw, max_types, paper_constraint, integer=True)
    res = _run(model, max(0.5, time_limit - (time.perf_counter() - t0)), mip_rel_gap)
    if res.status == 2:
        _raise_infeasible(problem, budget_bpw, max_types, paper_constraint)
    if res.x is None:
        return None
    choice = _x_to_choice(model, res.x, problem.n_units)
    if violations(problem, choice, budget_bpw, max_types, paper_constraint):
        # HiGHS feasibility tolerance can leave the budget a hair over: make it exact
        choice = greedy_repair(problem, choice, budget_bpw, max_types, paper_constraint)
    dual = getattr(res, "mip_dual_bound", None)
    bound = float(dual) * model.scale if dual is not None and np.isfinite(dual) else float("nan")
    total = float(problem.cost[np.arange(problem.n_units), choice].sum())
    return make_allocation(
        problem, choice, strategy="gemq", budget_bpw=budget_bpw,
        status="optimal" if res.status == 0 else "time_limit", gap=_gap(total, bound), bound=bound,
        seconds=time.perf_counter() - t0, method="milp", max_types=max_types,
    )


def solve_gemq(
    problem: AllocationProblem,
    budget_bpw: float,
    max_types: int | None = 3,
    time_limit: float = 60.0,
    mip_rel_gap: float = 1e-4,
    paper_constraint: bool = False,
    method: str = "auto",
) -> Allocation:
    """Global minimum of sum(cost) under the bits budget: GEMQ's allocation.

    1. Relaxation + rounding (solve_lp_round): an incumbent and a proven lower bound in about a
       second at 10^4 units. method='auto' returns it when the gap is already <= mip_rel_gap.
    2. Otherwise the HiGHS MILP, on the problem reduced by Lagrangian variable fixing (a pair
       (unit, type) whose forced lower bound exceeds the incumbent cannot be in a better solution,
       so dropping it is exact); this shrinks 10^4-unit models to a few hundred live variables.
       The cheaper of incumbent and MILP answer is returned, gap against the best proven bound.
    method='milp' always runs step 2; 'lp-round' stops after step 1.
    status: 'optimal' = proven within mip_rel_gap; 'time_limit' = best found, see gap.
    """
    if method not in ("auto", "milp", "lp-round"):
        raise ValueError(f"unknown method {method!r}")
    check_budget(problem, budget_bpw)
    if max_types is not None and max_types < 1:
        raise GemqError(f"--max-types {max_types} allows no type at all.", "use --max-types 1 or more.")
    t0 = time.perf_counter()
    heur: Allocation | None
    lag: _Lagrangian | None
    try:
        heur, lag = _lp_round(problem, budget_bpw, max_types, paper_constraint)
    except GemqError:
        if method == "lp-round":
            raise
        heur, lag = None, None
    if method == "lp-round":
        assert heur is not None
        return heur
    if method == "auto" and heur is not None and heur.gap <= mip_rel_gap:
        return replace(heur, status="optimal", seconds=time.perf_counter() - t0)
    target = problem
    if heur is not None and lag is not None and np.isfinite(lag.bound):
        forced = _forced_bounds(lag.rel, lag.lam, budget_bpw)
        target = reduce_by_bound(problem, forced, heur.total_cost, heur.type_index)
    exact: Allocation | None
    try:
        exact = solve_milp(
            target, budget_bpw, max_types, time_limit - (time.perf_counter() - t0),
            mip_rel_gap, paper_constraint,
        )
    except GemqError:
        if heur is None:
            raise
        exact = None  # reduced problem has nothing cheaper than the incumbent
        exact_bound = heur.total_cost
    else:
        exact_bound = float("nan") if exact is None else exact.bound
    if exact is not None and violations(problem, exact.type_index, budget_bpw, max_types, paper_constraint):
        exact = None  # a paper row dropped by the reduction: the incumbent stands
    bounds = []
    if heur is not None:
        bounds.append(heur.bound)
        # any solution cheaper than the incumbent lives in the reduced problem
        if np.isfinite(exact_bound):
            bounds.append(min(heur.total_cost, exact_bound))
    elif exact is not None:
        bounds.append(exact.bound)
    bounds = [b for b in bounds if np.isfinite(b)]
    bound = max(bounds) if bounds else float("nan")
    candidates = [a for a in (exact, heur) if a is not None]
    if not candidates:
        _raise_infeasible(problem, budget_bpw, max_types, paper_constraint)
    best = min(candidates, key=lambda a: a.total_cost)  # ties keep the MILP answer
    best = make_allocation(
        problem, best.type_index, strategy="gemq", budget_bpw=budget_bpw, status="",
        gap=0.0, bound=0.0, seconds=0.0, method=best.method, max_types=max_types,
    )
    gap = _gap(best.total_cost, bound)
    proven = np.isfinite(gap) and gap <= mip_rel_gap * (1 + 1e-9)
    return replace(
        best, status="optimal" if proven else "time_limit", gap=gap, bound=bound,
        seconds=time.perf_counter() - t0,
    )


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
    """Every layer gets the same bpw budget, solved per layer with the GEMQ MILP (PMQ / MC-MoE style)."""
    check_budget(problem, budget_bpw)
    t0 = time.perf_counter()
    layers = problem.layers
    uniq = np.unique(layers)
    choice = np.empty(problem.n_units, dtype=np.int64)
    statuses, bound, gaps = [], 0.0, []
    for i, layer in enumerate(uniq):
        idx = np.flatnonzero(layers == layer)
        sub = problem.subset(idx)
        lo, hi = sub.bpw_range()
        if budget_bpw < lo * (1 - 1e-12):
            raise GemqError(
                f"Layerwise: layer {layer} cannot reach {budget_bpw:g} bpw (its lowest is {lo:.4f}).",
                "raise --budget or use --strategy gemq, which shares bits across layers.",
            )
        left = max(0.5, (time_limit - (time.perf_counter() - t0)) / (len(uniq) - i))
        a = solve_gemq(sub, budget_bpw, max_types, left, mip_rel_gap, paper_constraint, method)
        choice[idx] = a.type_index
        statuses.append(a.status)
        gaps.append(a.gap)
        bound += a.bound if np.isfinite(a.bound) else np.nan
    status = "optimal" if all(s == "optimal" for s in statuses) else "time_limit"
    total = float(problem.cost[np.arange(problem.n_units), choice].sum())
    return make_allocation(
        problem, choice, strategy="layerwise", budget_bpw=budget_bpw, status=status,
        gap=_gap(total, bound), bound=bound, seconds=time.perf_counter() - t0,
        method="milp-per-layer", max_types=max_types,
    )


SOLVERS: dict[str, Callable[..., Allocation]] = {
    "gemq": solve_gemq,
    "layerwise": solve_layerwise,
    "uniform": solve_uniform,
}


def solve(strategy: str, problem: AllocationProblem, budget_bpw: float, **kwargs: Any) -> Allocation:
    """Dispatch on --strategy (gemq | layerwise | uniform); kwargs go to the solver."""
    if strategy not in SOLVERS:
        raise GemqError(f"Unknown strategy {strategy!r}.", f"use --strategy one of: {', '.join(STRATEGIES)}.")
    return SOLVERS[strategy](problem, budget_bpw, **kwargs)


def synthetic_problem(
    n_layers: int,
    n_experts: int,
    types: Sequence[str] = DEFAULT_TYPES,
    projs: Iterable[str | None] = (None,),
    seed: int = 0,
    params_per_unit: int = 3 * 2048 * 768,
) -> AllocationProblem:
    """Realistic-looking synthetic costs (error ~ 4^-bpw, lognormal sensitivity per expert and layer),
    for tests and solver benchmarks."""
    rng = np.random.default_rng(seed)
    projs = list(projs)
    units = [(l, e, p) for l in range(n_layers) for e in range(n_experts) for p in projs]
    bpw = bpw_of(types)
    layer_s = rng.lognormal(0.0, 1.0, n_layers)
    sens = np.array([layer_s[u[0]] for u in units]) * rng.lognormal(0.0, 1.0, len(units))
    noise = rng.lognormal(0.0, 0.15, (len(units), len(types)))
    cost = sens[:, None] * 4.0 ** (-bpw[None, :]) * noise * 1e-3
    params = np.full(len(units), float(params_per_unit))
    return AllocationProblem.build(units, types, cost, params)
