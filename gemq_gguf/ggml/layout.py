"""The grouped expert layout (docs/gguf-layout.md): a layer-projection whose experts have different types
is stored as one tensor per type (`blk.N.ffn_P_exps.q{g}.weight`) plus an I32 map (`.qmap`, [G, n_expert]:
the expert's row in group g, or -1). Experts are numbered group by group, so the patched CUDA kernels
find an expert's group by comparing its index with the groups' first experts.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .types import type_info


def group_tensor_name(expert_name: str, group: int) -> str:
    """Group g of a grouped expert tensor: blk.N.ffn_P_exps.weight -> blk.N.ffn_P_exps.q{g}.weight."""
    return f"{expert_name.removesuffix('.weight')}.q{group}.weight"


def qmap_name(expert_name: str) -> str:
    """The I32 map of a grouped expert tensor: blk.N.ffn_P_exps.weight -> blk.N.ffn_P_exps.qmap."""
    return f"{expert_name.removesuffix('.weight')}.qmap"


def expert_qmap(members: Sequence[Sequence[int]], n_experts: int) -> np.ndarray:
    """The map of a grouped tensor: `members[g]` are the (file) expert ids stored in group g, in order."""
    qmap = np.full((len(members), n_experts), -1, dtype=np.int32)
    for g, ids in enumerate(members):
        qmap[g, np.asarray(ids, dtype=np.int64)] = np.arange(len(ids), dtype=np.int32)
    return qmap


def group_major_order(types: list[list[str]], n_routing_groups: int = 1) -> list[int]:
    """New expert numbering of a layer: old expert ids in their new order. A stable sort by routing
    group (DeepSeek's group-limited routing needs its experts to stay in their group), then by the
    ggml type id of each projection in `types`; experts of one type per projection end up adjacent,
    groups ascending by type id as the layout orders them. Identity when every expert has one type."""
    n = len(types[0])
    per = n // max(n_routing_groups, 1)
    ids = [[type_info(t).id for t in ts] for ts in types]
    return sorted(range(n), key=lambda e: (e // per, *(row[e] for row in ids)))
