"""Synthetic allocation problems: realistic-looking costs without a model, for the allocation tests
and the solver benchmark (bench/solver_speed.py imports this file)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from gemq_gguf.allocate import AllocationProblem, bpw_of
from gemq_gguf.options import DEFAULT_TYPES


def synthetic_problem(
    n_layers: int,
    n_experts: int,
    types: Sequence[str] = DEFAULT_TYPES,
    projs: Iterable[str | None] = (None,),
    seed: int = 0,
    params_per_unit: int = 3 * 2048 * 768,
) -> AllocationProblem:
    """Error ~ 4^-bpw (each bit quarters the squared error), lognormal sensitivity per layer and per
    unit, a little per-type noise: the shape measured costs have, at any size."""
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
