"""Facts about ggml types, read from ggml itself (libggml-base of the installed llama-cpp-python).

Bits per weight, block sizes and imatrix requirements are never written by hand: budgets must match
the bytes llama.cpp writes, whatever ggml version is installed.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from gguf import GGMLQuantizationType

from ..errors import GemqError
from .lib import ggml_base_file, llama_cpp_lib_dir

# llama.cpp's own fallback for row widths a type cannot take (llama-quant.cpp, tensor_type_fallback).
FALLBACK = {
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
    "Q2_0": "Q4_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0",
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}


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


def _lib_dir() -> Path:
    override = os.environ.get("GEMQ_GGML_LIB_DIR")
    d = Path(override) if override else llama_cpp_lib_dir()
    if d is None:
        raise GemqError("llama-cpp-python is not installed, so ggml's quantizer is not available.",
                        "run ./setup.sh (it builds the patched llama-cpp-python).")
    return d


@cache
def ggml_lib() -> ctypes.CDLL:
    """libggml-base, loaded once; ctypes.CDLL releases the GIL, so threads quantize in parallel."""
    d = _lib_dir()
    f = ggml_base_file(d)
    if f is None:
        raise GemqError(f"libggml-base was not found in {d}.",
                        "reinstall llama-cpp-python with ./setup.sh, or point GEMQ_GGML_LIB_DIR at its lib folder.")
    lib = ctypes.CDLL(str(f))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def traits(type_id: int) -> _Traits:
    return ggml_lib().ggml_get_type_traits(type_id).contents


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


@cache
def type_info(name: str) -> TypeInfo:
    """Block size, bytes per block and imatrix requirement of a ggml type (by name, e.g. 'Q4_K')."""
    tid = int(GGMLQuantizationType[canonical(name)])
    tr = traits(tid)
    return TypeInfo(name=name.upper(), id=tid, block_size=int(tr.blck_size), type_size=int(tr.type_size),
                    requires_imatrix=bool(ggml_lib().ggml_quantize_requires_imatrix(tid)))


def fitting_type(name: str, n_per_row: int) -> str:
    """The type llama.cpp itself would use for rows of this width: `name`, or its fallback, or F16."""
    if type_info(name).fits(n_per_row):
        return type_info(name).name
    fb = FALLBACK.get(type_info(name).name, "F16")
    return fb if type_info(fb).fits(n_per_row) else "F16"


def matrix_bits(rows: int, width: int, type_name: str) -> int:
    """Exact bits of a [rows, width] matrix stored as `type_name`."""
    return rows * type_info(type_name).row_bytes(width) * 8
