"""The allocation problem: units, candidate types, their costs and exact bits, and its constraints.

A unit is what gets one quant type: an expert, an expert-projection, or a whole layer-projection
tensor. Costs are the predicted loss increase of quantizing the unit to a type (Fisher-weighted output
error measured with ggml's own quantizer, costs.py); bits are counted in real ggml bits per weight so a
budget is a file size. The checks here are shared by every solver, so all judge feasibility alike.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np

from ..errors import GemqError
from ..ggml.types import type_info

UnitKey = tuple[int, int | None, str | None]
"""(layer, expert, proj): proj None = whole expert; expert None = all experts of a layer-projection."""



def bpw_of(types: Sequence[str]) -> np.ndarray:
    """Real ggml bits per weight of each type (Q2_K is 2.625, not 2), read from ggml so budgets match
    file sizes. An unknown name is a user error (GemqError naming the known types), not a KeyError."""
    return np.array([type_info(t).bpw for t in types], dtype=np.float64)


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
    ) -> AllocationProblem:
        """Convenience: bpw from ggml and groups from (layer, proj) when not given."""
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

    def cost_of(self, type_index: np.ndarray) -> float:
        """Total cost of a choice (one type index per unit)."""
        return float(self.cost[np.arange(self.n_units), type_index].sum())

    def bpw_range(self) -> tuple[float, float]:
        """Lowest and highest reachable average bpw (ignoring max-types, which never binds at the ends)."""
        b = self.bit_matrix
        allowed = self.allowed
        lo = np.where(allowed, b, np.inf).min(axis=1).sum()
        hi = np.where(allowed, b, -np.inf).max(axis=1).sum()
        return float(lo / self.total_params), float(hi / self.total_params)

    def subset(self, idx: np.ndarray) -> AllocationProblem:
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


# ----------------------------------------------------------------------------- granularity


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


# ----------------------------------------------------------------------------- constraints


def check_budget(problem: AllocationProblem, budget_bpw: float) -> None:
    """Fail early, with the reachable range, when no choice fits the budget."""
    lo, hi = problem.bpw_range()
    if not np.isfinite(budget_bpw) or budget_bpw < lo * (1 - 1e-12):
        raise GemqError(
            f"Budget {budget_bpw:g} bpw is below the lowest reachable average "
            f"({lo:.4f} bpw; the highest is {hi:.4f} bpw) with types {', '.join(problem.types)}.",
            f"use --budget between {lo:.4f} and {hi:.4f}, or add a lower-bit type to --types.",
        )


def raise_infeasible(problem: AllocationProblem, budget_bpw: float, max_types: int | None, paper: bool) -> NoReturn:
    """The budget is reachable but not with the extra constraints: say which ones, and the range without."""
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


def cap_bits(problem: AllocationProblem, budget_bpw: float) -> float:
    """The budget in bits."""
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
