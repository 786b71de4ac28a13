"""GEMQ bit allocation: choose one ggml quant type per unit (expert, expert-projection or tensor).

Pure math, no model: the caller supplies a cost matrix (predicted loss increase of quantizing each
unit to each type) and the sizes; one global integer program is solved under an average
bits-per-weight budget counted in real ggml bpw. Baselines (uniform, layerwise) go through the same
interface so reports compare like with like.

problem.py: the problem and its constraints; result.py: the solved Allocation; relax.py: Lagrangian
relaxation and rounding; greedy.py: repair to feasibility; milp.py: the HiGHS model; gemq.py: GEMQ's
solver (relaxation, then MILP on the reduced problem); baselines.py: uniform and layerwise.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import GemqError
from ..options import STRATEGIES
from .baselines import solve_layerwise, solve_uniform
from .gemq import solve_gemq
from .milp import solve_milp
from .problem import (
    AllocationProblem,
    UnitKey,
    bpw_of,
    check_budget,
    coarsen,
    default_groups,
    expand,
    granularity,
    to_expert_granularity,
    to_tensor_granularity,
    violations,
)
from .relax import solve_lp_round
from .result import Allocation

SOLVERS: dict[str, Callable[..., Allocation]] = {"gemq": solve_gemq, "layerwise": solve_layerwise,
                                                 "uniform": solve_uniform}  # one per options.STRATEGIES


def solve(strategy: str, problem: AllocationProblem, budget_bpw: float, **kwargs: Any) -> Allocation:
    """Dispatch on --strategy (gemq | layerwise | uniform); kwargs go to the solver."""
    if strategy not in SOLVERS:
        raise GemqError(f"Unknown strategy {strategy!r}.", f"use --strategy one of: {', '.join(STRATEGIES)}.")
    return SOLVERS[strategy](problem, budget_bpw, **kwargs)


__all__ = [
    "SOLVERS", "Allocation", "AllocationProblem", "UnitKey", "bpw_of",
    "check_budget", "coarsen", "default_groups", "expand", "granularity", "solve", "solve_gemq",
    "solve_layerwise", "solve_lp_round", "solve_milp", "solve_uniform", "to_expert_granularity",
    "to_tensor_granularity", "violations",
]
