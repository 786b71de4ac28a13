"""cpp_patch 0008: the IQ2/IQ3 quantizers' SIMD neighbour search and the IQ4 quantizers' branch-free grid
index give stock ggml's bytes exactly.

The reference is the one-at-a-time loop kept in the same library (`quant.reference_search`), so the
comparison holds for the compiler and flags this build used. Rows are chosen to reach every branch of
the searches: ordinary and heavy-tailed weights (long neighbour lists), tiny and all-zero sub-blocks
(skipped sub-blocks), rows on IQ4's grid and its midpoints (exact ties in its index), constant and
lattice rows under a flat importance matrix (exact ties between neighbours that are permutations of each
other: the first in the list must win), and an importance matrix with near-zero entries (weights that
vanish in the distance).
"""
from __future__ import annotations

import numpy as np
import pytest

from gemq_gguf.ggml import quant



@pytest.fixture(scope="module")
def hard_rows() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((48, 1024)).astype(np.float32)
    x[1::8] = rng.standard_t(1.5, x[1::8].shape)                # heavy tails
    x[2::8] *= 1e-6                                             # tiny values
    x[3, :512] = 0.0                                            # all-zero sub-blocks
    x[4] = 0.37                                                 # constant: ties in the search
    x[5] = np.round(x[5] * 2) / 2                               # values on a coarse lattice
    x[6::8] = np.abs(x[6::8])                                   # all one sign
    x[7::8] = rng.integers(-3, 4, x[7::8].shape) * 0.25          # few distinct values
    # IQ4's grid (ggml's kvalues_iq4nl) and its midpoints times 2^-5, each block of 32 led by -127 * 2^-5: a
    # scale trial then lands exactly on midpoints, where the branch-free index must break ties as the stock one
    grid = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
    on_grid = np.concatenate([grid, (grid[1:] + grid[:-1]) / 2])  # its values and the midpoints between them
    x[0] = on_grid[rng.integers(0, on_grid.size, 1024)] * 2.0**-5
    x[0, ::32] = -127 * 2.0**-5
    imatrix = (rng.random(1024) + 0.05).astype(np.float32)
    imatrix[::17] = 1e-9
    return x, imatrix


@pytest.mark.parametrize("flat", [False, True], ids=["imatrix", "flat-imatrix"])
@pytest.mark.parametrize("name", quant.PATCHED_SEARCH_TYPES)
def test_simd_search_gives_stock_bytes(hard_rows: tuple[np.ndarray, np.ndarray], name: str, flat: bool) -> None:
    x, imatrix = hard_rows
    if flat:
        imatrix = np.ones_like(imatrix)
    fast = quant.quantize(x, name, imatrix, threads=1)
    with quant.reference_search():
        ref = quant.quantize(x, name, imatrix, threads=1)
    assert fast.shape == ref.shape
    differing = np.flatnonzero((fast != ref).any(axis=1))
    assert differing.size == 0, f"{name}: rows {differing[:10]} differ from the one-at-a-time search"

