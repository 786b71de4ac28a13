"""The whole-file problem: routed-expert units and one unit per non-expert tensor, under one bit budget.

Pure math like the rest of allocate/: the caller brings the expert problem (at its granularity) and the
non-expert tensors' costs and exact bits (names, types, cost [N, T], bits [N, T], params [N]). A
non-expert tensor's unit key is (layer, None, GGUF name): layer is its block (-1 outside the blocks:
token_embd, output), the name tells it from an expert projection ('gate', 'up', 'down', 'gate_up'). It
is one tensor with one type, so it belongs to no max-types group. The solved joint allocation splits
back into the expert `Allocation` (the report and plan code see an expert problem, as with --budget)
and the tensors' `TensorChoice`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from ..errors import GemqError
from ..options import FileTarget
from .problem import AllocationProblem, UnitKey, bpw_of
from .result import Allocation

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")
#: the joint budget is shrunk by this relative margin: solvers accept 1e-9 relative excess, a file never may
BUDGET_MARGIN = 1e-8


def tensor_layer(name: str) -> int:
    """The block of a GGUF tensor name, -1 for tensors outside the blocks (token_embd, output)."""
    m = _BLOCK_RE.match(name)
    return int(m.group(1)) if m else -1


def tensor_unit(name: str) -> UnitKey:
    """The unit key of a non-expert tensor: (layer, None, GGUF name)."""
    return (tensor_layer(name), None, name)


def is_tensor_unit(unit: UnitKey) -> bool:
    """True for a non-expert tensor's key (its proj slot holds the GGUF name, ending in '.weight')."""
    return unit[1] is None and isinstance(unit[2], str) and unit[2].endswith(".weight")


@dataclass(frozen=True)
class TensorChoice:
    """The types the joint allocation gave the non-expert tensors, with their costs and exact bits."""

    names: list[str]
    types: list[str]
    cost: np.ndarray
    bits: np.ndarray
    params: np.ndarray

    def as_dict(self) -> dict[str, str]:
        """GGUF name -> type: what the writer takes (over the policy)."""
        return dict(zip(self.names, self.types))

    @property
    def total_bits(self) -> float:
        return float(self.bits.sum())

    @property
    def total_params(self) -> float:
        return float(self.params.sum())

    def rows(self) -> list[dict[str, Any]]:
        return [{"name": n, "layer": tensor_layer(n), "type": t, "cost": float(c), "bits": float(b),
                 "params": int(p), "bpw": float(b / p)}
                for n, t, c, b, p in zip(self.names, self.types, self.cost, self.bits, self.params)]


@dataclass(frozen=True, eq=False)
class JointProblem:
    """The joint problem and how its units split back: the first `n_expert` units are the experts'."""

    problem: AllocationProblem
    n_expert: int
    expert_types: list[str]

    @property
    def names(self) -> list[str]:
        return [str(u[2]) for u in self.problem.units[self.n_expert:]]

    def budget_bpw(self, free_bits: float) -> float:
        """The solvers' budget (bpw over the decided units) for `free_bits` bits, shrunk by BUDGET_MARGIN
        so that the 1e-9 tolerance solvers allow can never push the total past `free_bits`."""
        return float(free_bits) * (1.0 - BUDGET_MARGIN) / self.problem.total_params

    def split(self, alloc: Allocation) -> tuple[Allocation, TensorChoice]:
        """The expert part as an expert-only Allocation (expert types only; budget in expert bpw = the
        bits the experts got) and the tensors' choice."""
        e = self.n_expert
        pos = {t: i for i, t in enumerate(self.expert_types)}
        choice = alloc.choice
        expert_bits = alloc.unit_bits[:e]
        expert = replace(alloc, units=list(alloc.units[:e]), types=list(self.expert_types),
                         type_index=np.array([pos[t] for t in choice[:e]], dtype=np.int64),
                         unit_cost=alloc.unit_cost[:e].copy(), unit_bits=expert_bits.copy(),
                         unit_params=alloc.unit_params[:e].copy(),
                         budget_bpw=float(expert_bits.sum() / alloc.unit_params[:e].sum()),
                         type_bpw=bpw_of(self.expert_types))
        tensors = TensorChoice(names=self.names, types=choice[e:], cost=alloc.unit_cost[e:].copy(),
                               bits=alloc.unit_bits[e:].copy(), params=alloc.unit_params[e:].copy())
        return expert, tensors


def joint_problem(experts: AllocationProblem, names: Sequence[str], types: Sequence[str], cost: np.ndarray,
                  bits: np.ndarray, params: np.ndarray) -> JointProblem:
    """Experts + one unit per named tensor. The columns are the union of both candidate lists (experts'
    first, then the tensors' new ones); a type outside a unit's own list is not allowed for it (cost inf,
    nominal bits). Expert groups stay as they are; tensors are in none."""
    if len(set(names)) != len(names):
        raise ValueError("tensor names must be distinct")
    cost, bits = np.asarray(cost, dtype=np.float64), np.asarray(bits, dtype=np.float64)
    params = np.asarray(params, dtype=np.float64)
    n, t_own = len(names), len(types)
    if cost.shape != (n, t_own) or bits.shape != (n, t_own) or params.shape != (n,):
        raise ValueError("tensor cost and bits must be [N, T], params [N]")
    all_types = list(experts.types) + [t for t in types if t not in experts.types]
    col = {t: i for i, t in enumerate(all_types)}
    bpw = bpw_of(all_types)
    e_cost = np.full((experts.n_units, len(all_types)), np.inf)
    e_bits = experts.params[:, None] * bpw[None, :]
    e_cost[:, :experts.n_types] = experts.cost
    e_bits[:, :experts.n_types] = experts.bit_matrix
    t_cost = np.full((n, len(all_types)), np.inf)
    t_bits = params[:, None] * bpw[None, :]
    for j, t in enumerate(types):
        t_cost[:, col[t]] = cost[:, j]
        ok = np.isfinite(cost[:, j])
        t_bits[ok, col[t]] = bits[ok, j]
    units = list(experts.units) + [tensor_unit(x) for x in names]
    problem = AllocationProblem(units=units, types=all_types, cost=np.vstack([e_cost, t_cost]),
                                params=np.concatenate([experts.params, params]), bpw=bpw,
                                bits=np.vstack([e_bits, t_bits]), groups=list(experts.groups))
    return JointProblem(problem, experts.n_units, list(experts.types))


@dataclass(frozen=True)
class FileParts:
    """What the file holds besides the allocation's choices, measured on the float GGUF before any
    choice: each non-expert tensor's bytes in the type the policy gives it and its weights, the weights
    of every tensor, and an upper bound on the bytes that are not tensor data (header, metadata, tensor
    infos, the grouped layout's maps, alignment padding)."""

    policy_bytes: dict[str, int]
    params: dict[str, int]
    total_params: int
    overhead_bytes: int

    def fixed(self, decided: set[str]) -> FileBits:
        """The bits of the non-expert tensors the allocation does not decide (typed by the policy)."""
        rest = [n for n in self.policy_bytes if n not in decided]
        return FileBits(8 * sum(self.policy_bytes[n] for n in rest), sum(self.params[n] for n in rest),
                        8 * self.overhead_bytes)

    def target_bits(self, target: FileTarget) -> tuple[int, str, bool]:
        """(bits, what the user asked, whether the overhead counts): a size counts every byte of the file,
        a bpw only tensor data over every tensor's weights (llama.cpp's meaning: metadata excluded)."""
        if target.size is not None:
            return 8 * target.size, f"--target-size {target.spec} ({target.size:,} bytes)", True
        assert target.bpw is not None
        return int(np.floor(target.bpw * self.total_params)), f"--target-bpw {target.bpw:g}", False


@dataclass(frozen=True)
class FileBits:
    """Bits of the file the allocation does not decide: tensors kept float or policy-typed, and (for a
    size target) the upper bound on metadata, tensor infos and alignment padding."""

    fixed_tensor_bits: int
    fixed_params: int
    overhead_bits: int = 0

    def without_overhead(self) -> FileBits:
        return FileBits(self.fixed_tensor_bits, self.fixed_params, 0)


def free_bits(target_bits: int, fixed: FileBits, problem: AllocationProblem, what: str) -> float:
    """The bits the decided units may take under a target of `target_bits`; a one-line error with the
    feasible range when no choice fits or when every choice does (the target cannot be reached)."""
    lo_bpw, hi_bpw = problem.bpw_range()
    lo = lo_bpw * problem.total_params + fixed.fixed_tensor_bits + fixed.overhead_bits
    hi = hi_bpw * problem.total_params + fixed.fixed_tensor_bits + fixed.overhead_bits
    total_params = problem.total_params + fixed.fixed_params
    what_bytes = "bytes" if fixed.overhead_bits else "bytes of tensor data"
    span = (f"{int(np.ceil(lo / 8)):,}-{int(hi // 8):,} {what_bytes}, {lo / total_params:.4f}-{hi / total_params:.4f} "
            f"bpw over {int(total_params):,} weights")
    free = float(target_bits - fixed.fixed_tensor_bits - fixed.overhead_bits)
    if free * (1.0 - BUDGET_MARGIN) < lo_bpw * problem.total_params:
        raise GemqError(f"{what} is below the smallest file these candidate types can make (feasible: {span}).",
                        "raise the target, or add narrower types to --types.")
    if target_bits > hi:
        raise GemqError(f"{what} is above the largest file these candidate types can make (feasible: {span}).",
                        "lower the target, or add wider types (e.g. Q8_0) to --types.")
    return free
