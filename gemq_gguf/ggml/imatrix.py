"""llama.cpp importance-matrix files (the GGUF imatrix format of tools/imatrix/imatrix.cpp), read and written.

Users can bring their own imatrix (from `llama-imatrix`) or take ours to `llama-quantize --imatrix`.
The format, as this llama.cpp version writes and loads it (common/imatrix-loader.cpp):
- KV `general.type` = "imatrix", `imatrix.datasets` (string array), `imatrix.chunk_count` and
  `imatrix.chunk_size` (u32; the loader needs all three to accept the file);
- for every weight tensor NAME (a GGUF tensor name such as `blk.3.ffn_down_exps.weight`), two F32
  tensors: `NAME.in_sum2`, ne = [n_in, n_mat] (raw Σ x² over the tokens each matrix saw) and
  `NAME.counts`, ne = [1, n_mat] (those token counts). n_mat is the number of experts for 3-D
  expert tensors and 1 otherwise.
llama-quantize uses in_sum2 / counts per matrix and all-ones where a count is 0; `means` does the same.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from ..errors import GemqError
from .names import expert_tensor_name

KV_TYPE = "general.type"
KV_DATASETS = "imatrix.datasets"
KV_CHUNK_COUNT = "imatrix.chunk_count"
KV_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"


@dataclass
class Imatrix:
    """Raw importance sums and counts per GGUF tensor name, as stored in the file.

    sums[name]: float32 [n_mat, n_in]; counts[name]: float32 [n_mat].
    """

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def __post_init__(self) -> None:
        if set(self.sums) != set(self.counts):
            raise ValueError("every imatrix entry needs both sums and counts")
        for name, s in self.sums.items():
            if s.ndim != 2 or self.counts[name].shape != (s.shape[0],):
                raise ValueError(f"{name}: sums {s.shape} and counts {self.counts[name].shape} do not match")

    def means(self) -> dict[str, np.ndarray]:
        """Per-matrix mean of x² [n_mat, n_in], ones where a matrix saw no tokens (as llama-quantize does)."""
        out = {}
        for name, s in self.sums.items():
            c = self.counts[name].astype(np.float64)[:, None]
            out[name] = np.where(c > 0, s / np.maximum(c, 1.0), 1.0).astype(np.float32)
        return out


def expert_imatrix(means: dict[str, np.ndarray], layer: int, proj: str, n_experts: int) -> np.ndarray | None:
    """[n_experts, n_in] importance for a routed-expert projection, or None when the imatrix lacks it.

    gate and up read the same input, so a file keyed by a merged `ffn_gate_up_exps` serves both.
    """
    names = [expert_tensor_name(layer, proj)] + ([expert_tensor_name(layer, "gate_up")] if proj in ("gate", "up") else [])
    for name in names:
        if name in means:
            m = means[name]
            if m.shape[0] != n_experts:
                raise GemqError(f"the imatrix has {m.shape[0]} matrices for {name}, the model {n_experts} experts.",
                                "use an imatrix computed for this model.")
            return m
    return None


def write_imatrix(path: Path | str, imatrix: Imatrix) -> None:
    """Write a GGUF imatrix file that llama-quantize and llama-imatrix --in-file accept (complete or not at all)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        _write(tmp, imatrix)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _write(path: Path, imatrix: Imatrix) -> None:
    w = GGUFWriter(str(path), arch="")
    w.kv_data[0].pop("general.architecture", None)  # llama-imatrix writes no architecture key
    w.add_string(KV_TYPE, "imatrix")
    w.add_array(KV_DATASETS, list(imatrix.datasets))
    w.add_uint32(KV_CHUNK_COUNT, int(imatrix.chunk_count))
    w.add_uint32(KV_CHUNK_SIZE, int(imatrix.chunk_size))
    for name in sorted(imatrix.sums):  # llama-imatrix sorts names too
        w.add_tensor(name + SUM_SUFFIX, np.ascontiguousarray(imatrix.sums[name], dtype=np.float32))
        w.add_tensor(name + COUNT_SUFFIX, np.ascontiguousarray(imatrix.counts[name], dtype=np.float32)[:, None])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _field(reader: GGUFReader, key: str) -> object | None:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def read_imatrix(path: Path | str) -> Imatrix:
    """Read a GGUF imatrix file (the legacy .dat format is refused with a conversion hint)."""
    path = Path(path)
    if not path.is_file():
        raise GemqError(f"imatrix file {path} does not exist.", "pass a file written by llama-imatrix or gemq-gguf.")
    regen = "compute it again with llama-imatrix (or --save-imatrix), and check the copy is complete."
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:
        with path.open("rb") as fh:
            gguf_magic = fh.read(4) == b"GGUF"
        if gguf_magic:
            raise GemqError(f"{path} is a GGUF file that cannot be read: truncated or damaged ({e}).", regen) from None
        raise GemqError(f"{path} is not a GGUF imatrix (the old .dat format is not read).",
                        f"convert it: llama-imatrix --in-file {path.name} -o imatrix.gguf.") from None
    tensors = {t.name: t for t in reader.tensors}
    sums, counts = {}, {}
    for tname, t in tensors.items():
        if not tname.endswith(SUM_SUFFIX):
            continue
        name = tname[: -len(SUM_SUFFIX)]
        c = tensors.get(name + COUNT_SUFFIX)
        if c is None:
            raise GemqError(f"{path}: {tname} has no matching {name}{COUNT_SUFFIX}.", "regenerate the imatrix.")
        if t.tensor_type != GGMLQuantizationType.F32 or c.tensor_type != GGMLQuantizationType.F32:
            raise GemqError(f"{path}: sums and counts of {name} must be F32.", "regenerate the imatrix.")
        n_mat = int(c.n_elements)
        if n_mat == 0 or int(t.n_elements) % n_mat:
            raise GemqError(f"{path}: {name} has {int(t.n_elements)} sums for {n_mat} matrices.", regen)
        sums[name] = np.array(t.data, dtype=np.float32).reshape(n_mat, -1)
        counts[name] = np.array(c.data, dtype=np.float32).reshape(n_mat)
        if not (np.isfinite(sums[name]).all() and np.isfinite(counts[name]).all()) or (sums[name] < 0).any() \
                or (counts[name] < 0).any():
            raise GemqError(f"{path}: {name} holds NaN, Inf or negative values.", regen)
    if not sums:
        raise GemqError(f"{path} holds no imatrix entries.", "pass a file written by llama-imatrix or gemq-gguf.")
    datasets = _field(reader, KV_DATASETS)
    return Imatrix(sums=sums, counts=counts, datasets=[str(d) for d in datasets or []],
                   chunk_count=int(_field(reader, KV_CHUNK_COUNT) or 0),
                   chunk_size=int(_field(reader, KV_CHUNK_SIZE) or 0))
