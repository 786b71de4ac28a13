"""Costs of the non-expert tensors (attention, shared experts, dense MLPs, token_embd, output): the
same true-Fisher weighted output error as the routed experts' (`costs.weighted_sse`), for every
candidate type, so one allocation can decide every tensor of the file.

For a linear y = W x with the gradient g at its output (tensor_stats.py):
    cost[t] = scale · Σ_sampled tokens Σ_d (g_d · ((W − deq(quant_t(W, imatrix))) x)_d)²,
W read from stage 1's float GGUF (the bytes the writer quantizes), quantized by ggml's own quantizer
with the tensor's imatrix and llama.cpp's row-width fallback (`units.effective_type`), exactly what the
writer ships. scale = calibration tokens / sampled tokens puts the sums in the expert costs' units (the
experts' sums run over all calibration tokens, with the same loss and the same gradient convention).
For the embedding the output error of a token is the change of its row; only the rows the sample uses
are quantized (quantization is row-wise), the bits are the whole matrix's. A tensor with several uses
(tied embeddings: lookup and LM head) costs the sum.

Rows: the converter may permute rows (llama's q/k rope permute); the recorded row fingerprints of the
weight the model ran find the permutation, and a tensor whose rows are not those of the module (merged,
split or rescaled by the converter, e.g. DeepSeek's kv_b -> k_b / v_b) is left out with a note: it keeps
its policy type. Memory: the lm_head's error is computed in chunks of output rows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from ..errors import GemqError
from ..ggml.quant import dequantize, quantize, widen_bf16
from ..ggml.types import matrix_bits, type_info
from .stats import CalibStats
from .tensor_stats import LINEAR, TensorStats, TensorUse, fingerprint
from .units import effective_type

#: output rows per chunk of Δy = X ΔWᵀ (bounds the [K, rows] temporaries of a large vocabulary's head)
ROW_CHUNK = 8192


@dataclass
class TensorCostTable:
    """Costs and exact bits of every non-expert tensor the whole-file allocation decides."""

    names: list[str]        # GGUF tensor names, in the float GGUF's order
    types: list[str]        # candidate types = the columns
    cost: np.ndarray        # [N, T] float64, CostTable.cost's units; np.inf where the type is not allowed
    bits: np.ndarray        # [N, T] exact bits in the type the writer will use (llama.cpp's fallback applied)
    params: np.ndarray      # [N] int64
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


class TensorCostStore(Protocol):
    """Where a finished table goes and comes from (gemq.cache.TensorCostEntry)."""

    def load(self) -> TensorCostTable | None: ...

    def save(self, table: TensorCostTable) -> None: ...


def _float_tensors(float_gguf: Path) -> dict[str, np.ndarray]:
    """The float GGUF's 2-D tensors, memory-mapped, as ggml rows [rows, row width] (BF16 left as bits)."""
    from gguf import GGUFReader
    reader = GGUFReader(float_gguf)
    return {t.name: t for t in reader.tensors if len(t.shape) == 2}  # type: ignore[misc]


def _as_float(t: object) -> np.ndarray:
    from gguf import GGMLQuantizationType
    data = t.data  # type: ignore[attr-defined]
    if t.tensor_type == GGMLQuantizationType.BF16:  # type: ignore[attr-defined]
        return widen_bf16(np.asarray(data))
    if t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):  # type: ignore[attr-defined]
        raise GemqError(f"the float GGUF holds {t.name} as {t.tensor_type.name}.",  # type: ignore[attr-defined]
                        "convert from the Hugging Face checkpoint (stage 1 writes F32/F16/BF16).")
    return np.asarray(data, dtype=np.float32)


def row_order(w: np.ndarray, rows: torch.Tensor) -> np.ndarray | None:
    """perm with w[perm[i]] = the module's row i (found from the fingerprints), or None when the GGUF
    tensor is not a row permutation of the module's weight."""
    fp = fingerprint(w).numpy()
    ref = rows.numpy()
    tol = 1e-6 * max(float(np.abs(ref).max(initial=0.0)), 1e-30)
    if fp.shape != ref.shape:
        return None
    if np.allclose(fp, ref, rtol=0, atol=tol):
        return np.arange(len(ref))
    ih, ig = np.argsort(ref, kind="stable"), np.argsort(fp, kind="stable")
    if not np.allclose(fp[ig], ref[ih], rtol=0, atol=tol):
        return None
    perm = np.empty_like(ih)
    perm[ih] = ig
    return perm


def row_delta(w: np.ndarray, q: np.ndarray, et: str, rows: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """W − deq(Q) on GGUF rows `rows` (w, q: every row's floats and quantized bytes), in `dtype`."""
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    return torch.from_numpy(np.asarray(w[rows], dtype=np_dtype) - dequantize(q[rows], et, w.shape[1]).astype(np_dtype))


def linear_cost(x: torch.Tensor, g: torch.Tensor, w: np.ndarray, q: np.ndarray, et: str, perm: np.ndarray,
                device: torch.device, dtype: torch.dtype) -> float:
    """Σ (g ⊙ x Δᵀ)² over tokens and outputs, Δ = W − deq(Q) taken in the module's row order (module row i
    is GGUF row perm[i]), chunked over rows."""
    xs = x.to(device, dtype)
    total = 0.0
    for r in range(0, len(perm), ROW_CHUNK):
        dy = xs @ row_delta(w, q, et, perm[r:r + ROW_CHUNK], dtype).to(device).T
        total += float(((g[:, r:r + ROW_CHUNK].to(device, dtype) * dy) ** 2).sum())
    return total


def embedding_cost(g: torch.Tensor, delta_rows: torch.Tensor, inverse: torch.Tensor, device: torch.device,
                   dtype: torch.dtype) -> float:
    """Σ (g ⊙ Δ[id])² over tokens: `delta_rows` are the changed rows of the ids in use, `inverse` maps each
    token to its row there."""
    total = 0.0
    for r in range(0, len(inverse), ROW_CHUNK):
        dy = delta_rows.to(device, dtype)[inverse[r:r + ROW_CHUNK].to(device)]
        total += float(((g[r:r + ROW_CHUNK].to(device, dtype) * dy) ** 2).sum())
    return total


@dataclass
class _Tensor:
    """One GGUF tensor's uses, with each use's row order (module row i is GGUF row perm[i])."""

    name: str
    w: np.ndarray
    uses: list[tuple[TensorUse, np.ndarray]]


def _measurable(ts: TensorStats, tensors: dict[str, object], notes: list[str]) -> list[_Tensor]:
    """The GGUF tensors whose rows are the recorded modules' rows, in file order; notes say what is left out."""
    by_name: dict[str, list[TensorUse]] = {}
    for u in ts.uses:
        by_name.setdefault(u.name, []).append(u)
    out = []
    for name in [n for n in tensors if n in by_name]:
        t = tensors[name]
        w = _as_float(t)
        uses = []
        for u in by_name[name]:
            if u.rows is None or (u.kind == LINEAR and u.x not in ts.inputs):
                notes.append(f"{name}: {u.module} never ran during calibration; left out (policy type)")
                break
            perm = row_order(w, u.rows) if tuple(w.shape) == u.shape else None
            if perm is None:
                notes.append(f"{name}: its rows are not {u.module}'s (the converter merged, split or changed it; "
                             f"{tuple(w.shape)} vs {u.shape}); left out (policy type)")
                break
            uses.append((u, perm))
        else:
            out.append(_Tensor(name, w, uses))
    for name in sorted(by_name.keys() - tensors.keys()):
        notes.append(f"{name} ({', '.join(u.module for u in by_name[name])}): not in the float GGUF (the converter "
                     "merged, split or renamed it); left out (policy type)")
    return out


def _tensor_cost(ts: TensorStats, tensor: _Tensor, et: str, imat: np.ndarray | None, device: torch.device,
                 dtype: torch.dtype, threads: int | None) -> float:
    """One tensor's cost at effective type `et` (sum over its uses), in the expert costs' units."""
    w = tensor.w
    q = quantize(w, et, imat, threads) if any(u.kind == LINEAR for u, _ in tensor.uses) else None  # the writer's bytes
    total = 0.0
    for u, perm in tensor.uses:
        if u.kind == LINEAR:
            total += linear_cost(ts.inputs[u.x], u.g, w, q, et, perm, device, dtype)
            continue
        assert ts.ids is not None
        uniq, inverse = torch.unique(ts.ids, return_inverse=True)
        rows = perm[uniq.numpy()]
        if q is not None:
            d = row_delta(w, q, et, rows, dtype)
        else:  # only the rows the sample uses (quantization is row-wise)
            sub = np.asarray(w[rows])
            d = row_delta(sub, quantize(sub, et, imat, threads), et, np.arange(len(rows)), dtype)
        total += embedding_cost(u.g, d, inverse, device, dtype)
    return total * ts.scale


def tensor_cost_table(stats: CalibStats, float_gguf: Path, types: Sequence[str], *,
                      imatrix: dict[str, np.ndarray] | None = None, device: str | torch.device | None = None,
                      dtype: torch.dtype = torch.float32, threads: int | None = None,
                      store: TensorCostStore | None = None) -> TensorCostTable:
    """Costs and bits of every measurable non-expert tensor of `float_gguf` for every candidate type.

    imatrix: per-matrix means by GGUF name (default: the calibration's own, `stats.imatrix().means()`);
    a tensor without one cannot take types that need one (inf). `store`: a cached table is returned from
    it, a computed one saved to it.
    """
    if store is not None and (cached := store.load()) is not None:
        return cached
    ts = stats.tensors
    if ts is None:
        raise GemqError("the calibration statistics hold no records of the non-expert tensors.",
                        "calibrate with tensor_tokens > 0 (CalibOptions.tensor_tokens), or clear the stats cache.")
    t0 = time.perf_counter()
    types = [type_info(t).name for t in types]
    means = stats.imatrix().means() if imatrix is None else imatrix
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    notes = [f"{m}: left out" for m in ts.skipped]
    tensors = _measurable(ts, _float_tensors(Path(float_gguf)), notes)
    cost = np.full((len(tensors), len(types)), np.inf)
    bits = np.empty_like(cost)
    params = np.array([t.w.size for t in tensors], dtype=np.int64)
    with torch.no_grad():
        for i, tensor in enumerate(tensors):
            rows, width = tensor.w.shape
            imat = means.get(tensor.name)
            imat = None if imat is None else np.asarray(imat, dtype=np.float32).reshape(-1)
            memo: dict[str, float] = {}
            for j, t in enumerate(types):
                et = effective_type(t, width, True, imat is not None)
                if et is None:
                    bits[i, j] = tensor.w.size * type_info(t).bpw
                    why = "no imatrix" if type_info(t).requires_imatrix and imat is None else f"rows {width} wide"
                    notes.append(f"{tensor.name}: {t} not allowed ({why})")
                    continue
                if et != t:
                    notes.append(f"{tensor.name}: {t} becomes {et} for rows {width} wide (llama.cpp's fallback)")
                if et not in memo:
                    memo[et] = _tensor_cost(ts, tensor, et, imat, device, dtype, threads)
                cost[i, j], bits[i, j] = memo[et], matrix_bits(rows, width, et)
    table = TensorCostTable(names=[t.name for t in tensors], types=types, cost=cost, bits=bits, params=params,
                            notes=notes, seconds=time.perf_counter() - t0)
    if store is not None:
        store.save(table)
    return table
