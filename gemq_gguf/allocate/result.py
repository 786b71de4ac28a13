"""A solved allocation: one type per unit plus the numbers a report and the GGUF writer need."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .problem import AllocationProblem, UnitKey


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
    def from_dict(cls, d: dict[str, Any]) -> Allocation:
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
    def from_json(cls, text: str) -> Allocation:
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


def relative_gap(cost: float, bound: float) -> float:
    """(cost - bound) / cost, clipped at 0; nan without a finite bound, 0 for a zero cost."""
    if not np.isfinite(bound):
        return float("nan")
    if cost <= 0:
        return 0.0
    return max(0.0, (cost - bound) / cost)
