"""Units of the expert allocation (a whole expert, one expert-projection, or one layer-projection) and
their exact sizes: the types a unit's rows really get and the bits that costs, budgets and files share.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..allocate import UnitKey
from ..errors import GemqError
from ..ggml.names import PROJS
from ..ggml.types import fitting_type, matrix_bits, type_info
from ..options import GRANULARITIES

#: (rows, row width) of each projection of one expert, in ggml terms
Widths = dict[str, tuple[int, int]]


def unit_keys(layers: Sequence[int], n_experts: int, granularity: str,
              projs: tuple[str, ...] = PROJS) -> list[UnitKey]:
    """Units in a fixed order: layer-major, then expert, then projection."""
    if granularity == "expert":
        return [(l, e, None) for l in layers for e in range(n_experts)]
    if granularity == "expert-proj":
        return [(l, e, p) for l in layers for e in range(n_experts) for p in projs]
    if granularity == "tensor":
        return [(l, None, p) for l in layers for p in projs]
    raise GemqError(f"unknown granularity '{granularity}'.", f"use one of: {', '.join(GRANULARITIES)}.")


def unit_projs(unit: UnitKey, projs: tuple[str, ...] = PROJS) -> tuple[str, ...]:
    """The projections a unit covers (every one of the expert's for a whole expert)."""
    return projs if unit[2] is None else (unit[2],)


def effective_type(t: str, width: int, fallback: bool, has_imatrix: bool) -> str | None:
    """The type rows of `width` really get for candidate t (None: not allowed). With `fallback`
    (expert granularity, where gate/up/down share one choice) a type the rows cannot take becomes
    llama.cpp's own fallback, exactly as the writer will do."""
    et = fitting_type(t, width) if fallback else type_info(t).name
    if not type_info(et).fits(width) or (type_info(et).requires_imatrix and not has_imatrix):
        return None
    return et


def unit_bits(widths: Widths, projs: Sequence[str], types: Sequence[str], n: int, fallback: bool,
              has_imatrix: dict[str, bool]) -> tuple[np.ndarray, np.ndarray]:
    """(bits [T], allowed [T]) of a unit made of `projs` of `n` experts, for every candidate type.
    Where a type is not allowed the bits are nominal (params x bpw): the solver never picks it."""
    bits, allowed = np.empty(len(types)), np.ones(len(types), dtype=bool)
    params = n * sum(widths[p][0] * widths[p][1] for p in projs)
    for j, t in enumerate(types):
        eff = [effective_type(t, widths[p][1], fallback, has_imatrix[p]) for p in projs]
        if any(e is None for e in eff):
            bits[j], allowed[j] = params * type_info(t).bpw, False
        else:
            bits[j] = n * sum(matrix_bits(widths[p][0], widths[p][1], e) for p, e in zip(projs, eff))
    return bits, allowed
