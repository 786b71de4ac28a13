"""ggml's quantizer through ctypes: type facts, shape and imatrix guards, agreement with gguf-py."""
from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from gemq_gguf.errors import GemqError
from gemq_gguf.ggml import quant, types


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((16, 512)).astype(np.float32)


@pytest.mark.parametrize("name,bpw", [("Q2_K", 2.625), ("Q3_K", 3.4375), ("Q4_K", 4.5), ("Q6_K", 6.5625),
                                      ("IQ2_XXS", 2.0625), ("IQ4_XS", 4.25), ("Q8_0", 8.5), ("F16", 16.0)])
def test_bits_per_weight(name: str, bpw: float) -> None:
    assert types.type_info(name).bpw == bpw


def test_requires_imatrix_facts() -> None:
    assert types.type_info("IQ2_XXS").requires_imatrix and not types.type_info("Q2_K").requires_imatrix


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_1"])
def test_bytes_identical_to_gguf_py(rows: np.ndarray, name: str) -> None:
    ours = quant.quantize(rows, name)
    ref = gguf_quantize(rows, GGMLQuantizationType[name])
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("name", ["Q2_K", "Q4_K", "Q6_K", "IQ3_XXS", "IQ4_XS"])
def test_dequantize_matches_gguf_py(rows: np.ndarray, name: str) -> None:
    q = quant.quantize(rows, name)
    assert np.array_equal(quant.dequantize(q, name, rows.shape[1]), gguf_dequantize(q, GGMLQuantizationType[name]))


def test_error_falls_with_bits(rows: np.ndarray) -> None:
    err = {t: np.linalg.norm(quant.roundtrip(rows, t) - rows) / np.linalg.norm(rows) for t in ("Q2_K", "Q3_K", "Q4_K", "Q6_K")}
    assert err["Q2_K"] > err["Q3_K"] > err["Q4_K"] > err["Q6_K"] > 0
    assert 0.005 < err["Q6_K"] < 0.04 and 0.2 < err["Q2_K"] < 0.4


def test_imatrix_changes_and_helps_where_it_matters(rows: np.ndarray) -> None:
    imat = np.ones(512, dtype=np.float32)
    imat[:64] = 100.0  # the first columns matter most
    plain = quant.roundtrip(rows, "Q3_K")
    weighted = quant.roundtrip(rows, "Q3_K", imat)
    err = lambda w: float((((w - rows) ** 2) * imat).sum())  # noqa: E731
    assert err(weighted) < err(plain)


def test_threads_do_not_change_bytes(rows: np.ndarray) -> None:
    big = np.tile(rows, (8, 1))
    assert np.array_equal(quant.quantize(big, "Q4_K", threads=1), quant.quantize(big, "Q4_K", threads=2))


def test_guards(rows: np.ndarray) -> None:
    with pytest.raises(GemqError, match="multiple of 256"):
        quant.quantize(rows[:, :288], "Q4_K")
    with pytest.raises(GemqError, match="importance matrix"):
        quant.quantize(rows, "IQ2_XXS")
    with pytest.raises(GemqError, match="unknown ggml type"):
        types.type_info("Q9_X")


@pytest.mark.parametrize("name,width,expected", [("Q4_K", 1408, "Q5_0"), ("Q2_K", 1408, "Q4_0"),
                                                 ("IQ3_XXS", 1408, "IQ4_NL"), ("Q6_K", 1408, "Q8_0"),
                                                 ("Q4_K", 1024, "Q4_K"), ("Q4_K", 100, "F16")])
def test_fitting_type_follows_llama_quantize(name: str, width: int, expected: str) -> None:
    assert types.fitting_type(name, width) == expected


def test_mxfp4_experts_round_trip_through_bf16(rows: np.ndarray) -> None:
    """gpt-oss ships its experts as MXFP4; transformers hands them to us dequantized (bf16). Every MXFP4
    value is a bf16 value, and ggml's MXFP4 quantizer gives back the same bytes from its own dequantized
    rows, so `MXFP4` as an expert type reproduces the released experts exactly."""
    import torch
    width = rows.shape[1]
    q = quant.quantize(rows, "MXFP4")
    d = quant.dequantize(q, "MXFP4", width).reshape(rows.shape)
    as_bf16 = torch.from_numpy(d).bfloat16().float().numpy()
    assert np.array_equal(as_bf16, d)
    assert np.array_equal(quant.quantize(as_bf16, "MXFP4"), q)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_threads_follow_cpu_affinity() -> None:
    """A container or taskset grants fewer cores than the machine has: the quantizer's threads follow the grant."""
    granted = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(granted)})
        assert quant.cpu_threads() == 1
    finally:
        os.sched_setaffinity(0, granted)
    assert quant.cpu_threads() == len(granted)
