"""ctypes binding to ggml's own quantizer (libggml-base from llama-cpp-python).

Costs must be the costs of what ships, so every quantized byte in this project comes from the very
`ggml_quantize_chunk` that llama-quantize uses. Two traps of the C call are checked here before every
call, because ggml does not check them itself: a row length that is not a multiple of the block size
returns garbage, and IQ2_XXS / IQ2_XS / IQ1_S without an importance matrix abort the process.
"""
from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from .errors import GemqError
from .runtime import llama_cpp_lib_dir

# llama.cpp's own fallback for row widths a type cannot take (llama-quant.cpp, tensor_type_fallback).
_FALLBACK = {
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
    "Q2_0": "Q4_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0",
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}
_FLOAT_TYPES = {"F32": np.float32, "F16": np.float16}
_ROWS_PER_TASK = 32


class _Traits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def _lib_dir() -> Path:
    override = os.environ.get("GEMQ_GGML_LIB_DIR")
    d = Path(override) if override else llama_cpp_lib_dir()
    if d is None:
        raise GemqError("llama-cpp-python is not installed, so ggml's quantizer is not available.",
                        "run ./setup.sh (it builds the patched llama-cpp-python).")
    return d


@cache
def _lib() -> ctypes.CDLL:
    """libggml-base, loaded once; ctypes.CDLL releases the GIL, so threads quantize in parallel."""
    d = _lib_dir()
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (d / name).exists():
            lib = ctypes.CDLL(str(d / name))
            break
    else:
        raise GemqError(f"libggml-base was not found in {d}.",
                        "reinstall llama-cpp-python with ./setup.sh, or point GEMQ_GGML_LIB_DIR at its lib folder.")
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


@dataclass(frozen=True)
class TypeInfo:
    """Facts about one ggml type, read from ggml itself."""

    name: str
    id: int
    block_size: int
    type_size: int
    requires_imatrix: bool

    @property
    def bpw(self) -> float:
        """Real bits per weight in a GGUF file (Q2_K is 2.625, not 2)."""
        return 8.0 * self.type_size / self.block_size

    def fits(self, n_per_row: int) -> bool:
        return n_per_row % self.block_size == 0

    def row_bytes(self, n_per_row: int) -> int:
        return n_per_row // self.block_size * self.type_size


def canonical(name: str) -> str:
    """The ggml spelling of a type name ('q4_k' -> 'Q4_K'); a clear error for unknown names."""
    try:
        return GGMLQuantizationType[name.strip().upper()].name
    except KeyError:
        known = ", ".join(t.name for t in GGMLQuantizationType)
        raise GemqError(f"unknown ggml type '{name}'.", f"use one of: {known}.") from None


def _type_id(name: str) -> int:
    return int(GGMLQuantizationType[canonical(name)])


@cache
def type_info(name: str) -> TypeInfo:
    """Block size, bytes per block and imatrix requirement of a ggml type (by name, e.g. 'Q4_K')."""
    tid = _type_id(name)
    tr = _lib().ggml_get_type_traits(tid).contents
    return TypeInfo(name=name.upper(), id=tid, block_size=int(tr.blck_size), type_size=int(tr.type_size),
                    requires_imatrix=bool(_lib().ggml_quantize_requires_imatrix(tid)))


def fitting_type(name: str, n_per_row: int) -> str:
    """The type llama.cpp itself would use for rows of this width: `name`, or its fallback, or F16."""
    if type_info(name).fits(n_per_row):
        return type_info(name).name
    fb = _FALLBACK.get(type_info(name).name, "F16")
    return fb if type_info(fb).fits(n_per_row) else "F16"


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
    lib = _lib()
    lib.ggml_quantize_init(info.id)  # once, before threads race to build the IQ grids
    imat_ptr = None if imat is None else imat.ctypes.data

    def task(start: int) -> None:
        count = min(_ROWS_PER_TASK, n_rows - start)
        lib.ggml_quantize_chunk(info.id, src[start:].ctypes.data, out[start:].ctypes.data, 0, count, n, imat_ptr)

    starts = range(0, n_rows, _ROWS_PER_TASK)
    workers = threads or os.cpu_count() or 1
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
    to_float = _TO_FLOAT(_lib().ggml_get_type_traits(info.id).contents.to_float)
    to_float(src.ctypes.data, out.ctypes.data, out.size)
    return out


def roundtrip(rows: np.ndarray, name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """What llama.cpp will hold for these weights once quantized to `name` (float32, same shape)."""
    return dequantize(quantize(rows, name, imatrix), name, rows.shape[1])
