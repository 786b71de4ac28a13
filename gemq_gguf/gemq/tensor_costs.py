"""Costs and exact bits of the non-expert tensors the whole-file allocation decides.

Placeholder holding only the interface (docs: /work/wt/ISSUE16.md); the `tcost` branch owns this module
and brings `tensor_cost_table(stats, float_gguf, types)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TensorCostTable:
    """Costs and exact bits of every non-expert tensor the whole-file allocation decides."""

    names: list[str]        # GGUF tensor names, e.g. "blk.3.attn_q.weight", "token_embd.weight"
    types: list[str]        # candidate types = the columns
    cost: np.ndarray        # [N, T] float64, CostTable.cost's units; np.inf where the type is not allowed
    bits: np.ndarray        # [N, T] exact bits of the tensor in the type the writer will really use
    params: np.ndarray      # [N] int64
    notes: list[str] = field(default_factory=list)
