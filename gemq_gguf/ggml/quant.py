"""ggml's own quantizer through ctypes (libggml-base from llama-cpp-python).

Costs must be the costs of what ships, so every quantized byte in this project comes from the very
`ggml_quantize_chunk` that llama-quantize uses. Two traps of the C call are checked here before every
call, because ggml does not check them itself: a row length that is not a multiple of the block size
returns garbage, and IQ2_XXS / IQ2_XS / IQ1_S without an importance matrix abort the process.
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import numpy as np
from gguf import GGMLQuantizationType

from ..errors import GemqError
from .types import TypeInfo, fitting_type, ggml_lib, traits, type_info

# (GGUF tensor name, expert, type) -> quantized bytes: cost estimation hands its work to the writer
# (a dict, the stats cache's files: gemq.cache.QuantFiles, or its store of what writers quantized).
QuantCache = MutableMapping[tuple[str, int, str], np.ndarray]


@runtime_checkable
class SavedQuantCache(Protocol):
    """A QuantCache that saves what the writer adds (gemq.quant_store): `close()` after the write
    persists the rest and returns {"from_cache": n, "quantized": m} expert matrices."""

    def close(self) -> dict[str, int]: ...


_FLOAT_TYPES = {"F32": np.float32, "F16": np.float16}
_ROWS_PER_TASK = 32
_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def cpu_threads() -> int:
    """The cores this process may run on (its CPU affinity: a container or `taskset` grants fewer than the
    machine has, and os.cpu_count() would oversubscribe them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _check(name: str, rows: np.ndarray, imatrix: np.ndarray | None) -> TypeInfo:
    info = type_info(name)
    if rows.ndim != 2:
        raise ValueError(f"expected a 2-D array of rows, got shape {rows.shape}")
    n = rows.shape[1]
    if not info.fits(n):
        raise GemqError(f"{info.name} needs rows whose width is a multiple of {info.block_size}; these rows are {n} wide.",
                        f"choose a type that fits (llama.cpp would use {fitting_type(info.name, n)}).")
    if info.requires_imatrix and imatrix is None:
        raise GemqError(f"{info.name} cannot be made without an importance matrix.",
                        "calibrate (the default) or pass --imatrix, or drop this type from --types.")
    if imatrix is not None and imatrix.shape != (n,):
        raise ValueError(f"imatrix has shape {imatrix.shape}, expected ({n},)")
    return info


def quantize(rows: np.ndarray, name: str, imatrix: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """Quantize float rows [n_rows, n_per_row] to `name`; returns uint8 [n_rows, row_bytes], ggml's exact bytes."""
    if name.upper() in _FLOAT_TYPES:
        return np.ascontiguousarray(rows, dtype=_FLOAT_TYPES[name.upper()]).view(np.uint8).reshape(rows.shape[0], -1)
    if name.upper() == "BF16":
        from gguf.quants import quantize as gguf_quantize
        return gguf_quantize(np.asarray(rows, dtype=np.float32), GGMLQuantizationType.BF16)
    info = _check(name, rows, imatrix)
    src = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n = src.shape
    out = np.empty((n_rows, info.row_bytes(n)), dtype=np.uint8)
    imat = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    lib = ggml_lib()
    lib.ggml_quantize_init(info.id)  # once, before threads race to build the IQ grids
    imat_ptr = None if imat is None else imat.ctypes.data

    def task(start: int) -> None:
        count = min(_ROWS_PER_TASK, n_rows - start)
        lib.ggml_quantize_chunk(info.id, src[start:].ctypes.data, out[start:].ctypes.data, 0, count, n, imat_ptr)

    starts = range(0, n_rows, _ROWS_PER_TASK)
    workers = threads or cpu_threads()
    if workers == 1 or n_rows <= _ROWS_PER_TASK:
        for s in starts:
            task(s)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(task, starts))
    return out


def dequantize(data: np.ndarray, name: str, n_per_row: int) -> np.ndarray:
    """ggml's own to_float: uint8 [n_rows, row_bytes] -> float32 [n_rows, n_per_row]."""
    upper = name.upper()
    if upper in _FLOAT_TYPES:
        return data.view(_FLOAT_TYPES[upper]).reshape(-1, n_per_row).astype(np.float32)
    info = type_info(name)
    src = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, info.row_bytes(n_per_row))
    out = np.empty((src.shape[0], n_per_row), dtype=np.float32)
    to_float = _TO_FLOAT(traits(info.id).to_float)
    to_float(src.ctypes.data, out.ctypes.data, out.size)
    return out


def roundtrip(rows: np.ndarray, name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """What llama.cpp will hold for these weights once quantized to `name` (float32, same shape)."""
    return dequantize(quantize(rows, name, imatrix), name, rows.shape[1])


#: the types whose quantizer cpp_patch 0008 speeds up (and `reference_search` switches back to stock)
PATCHED_SEARCH_TYPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL")


@contextmanager
def reference_search() -> Iterator[None]:
    """Within: the IQ2/IQ3 quantizers search grid neighbours one at a time and the IQ4 ones index their grid
    by binary search, as stock ggml does, instead of the patched equivalents (cpp_patch 0008). Both must give
    the same bytes; tests and bench/iq_speed.py compare them. Not for concurrent use (a process-wide switch
    in ggml)."""
    lib = ggml_lib()
    if not hasattr(lib, "ggml_quantize_set_reference"):
        raise GemqError("this libggml-base lacks the quantizer-speed patch (ggml_quantize_set_reference).",
                        "rebuild llama-cpp-python with ./setup.sh.")
    lib.ggml_quantize_set_reference.argtypes = [ctypes.c_bool]
    lib.ggml_quantize_set_reference(True)
    try:
        yield
    finally:
        lib.ggml_quantize_set_reference(False)


def widen_bf16(data: np.ndarray) -> np.ndarray:
    """BF16 values (as uint16 or raw bytes) widened exactly to float32."""
    return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
