"""The disk a conversion needs, computed from the checkpoint's headers and checked before stage 1.

Stage 1 writes a float GGUF about the checkpoint's size into the work dir (a 61 GB Qwen3-30B-A3B: 61 GB),
so a disk too small used to fail with ENOSPC minutes or hours in. Instead every file the run will write
is sized from the safetensors headers and the request, summed per filesystem and compared with its free
space; a shortfall is one line naming the bytes needed and free, and the fix. What is counted:
- work dir: the float GGUF (1-D tensors F32 as the converter writes them, the rest at the intermediate's
  type; a tied LM head twice) plus the tokenizer; with `--budget`, the calibration's spill files (x and g
  past `stats.DEFAULT_RAM_LIMIT`, layer-boundary hidden states past `streaming.DEFAULT_BOUNDARY_LIMIT`
  when streaming), and the verification's reference log-probs;
- output: an upper bound: every matrix at the widest type the request can give it (candidate or uniform
  or plan types for experts, the tensor policy's types for the rest, llama.cpp's row-width fallback
  applied), routers and 1-D tensors F32.
- statistics cache (when on, and the run calibrates and writes): the expert part of the output bound, which
  the store of the writer's quantized experts (gemq.quant_store) may add. Its other entries are best effort
  (a write that fails is logged and skipped) and small next to it, so they are not counted.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .archs import MoeShape
from .errors import GemqError
from .ggml.types import fitting_type, type_info

#: margin on top of the sum: GGUF headers and alignment padding, metadata, the report and heatmap
MARGIN = 64 * 2**20


@dataclass(frozen=True)
class DiskNeed:
    """`size` bytes that the run writes under `path` (a folder), for `what`."""

    what: str
    path: Path
    size: int


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the filesystem of `path` (monkeypatched by tests)."""
    return shutil.disk_usage(path).free


def _filesystem(path: Path) -> int:
    return os.stat(path).st_dev


def _bytes_at(shape: tuple[int, ...], type_name: str) -> int:
    width = int(shape[-1]) if shape else 1
    rows = math.prod(int(d) for d in shape[:-1]) if len(shape) > 1 else 1
    return rows * type_info(fitting_type(type_name, width)).row_bytes(width)


def float_gguf_bytes(tensors: dict[str, tuple[int, ...]], outtype: str, tied_output: bool) -> int:
    """Tensor bytes of stage 1's float GGUF: 1-D tensors F32 (as llama.cpp's converter writes them), the
    rest at `outtype`; a tied embedding written again as output.weight."""
    total = 0
    for name, shape in tensors.items():
        size = math.prod(shape) * (4 if len(shape) <= 1 or outtype == "f32" else 2)
        total += size * (2 if tied_output and name.endswith("embed_tokens.weight") else 1)
    return total


def output_bound(tensors: dict[str, tuple[int, ...]], shape: MoeShape, expert_types: Iterable[str],
                 other_types: Iterable[str]) -> int:
    """An upper bound on the typed GGUF's tensor bytes: every matrix at the widest of the types it can
    get (after llama.cpp's row-width fallback); routers (a dimension of n_experts) and 1-D tensors F32."""
    expert_types, other_types = sorted(set(expert_types)), sorted(set(other_types))
    total = 0
    for name, s in tensors.items():
        if _float(name, s, shape):
            total += math.prod(s) * 4
            continue
        total += max(_bytes_at(s, t) for t in (expert_types if _expert(name, s) else other_types))
    return total


def expert_bound(tensors: dict[str, tuple[int, ...]], shape: MoeShape, expert_types: Iterable[str]) -> int:
    """The routed experts' part of `output_bound`: what the statistics cache's store of quantized experts
    (gemq.quant_store) may add in one run."""
    types = sorted(set(expert_types))
    return sum(max(_bytes_at(s, t) for t in types) for name, s in tensors.items()
               if not _float(name, s, shape) and _expert(name, s))


def _float(name: str, s: tuple[int, ...], shape: MoeShape) -> bool:
    """1-D tensors and routers (a dimension of n_experts), which stay F32."""
    return len(s) <= 1 or (len(s) == 2 and shape.n_experts in s and ".experts." not in name)


def _expert(name: str, s: tuple[int, ...]) -> bool:
    return ".experts." in name or len(s) == 3


def calibration_spill(shape: MoeShape, n_tokens: int, streamed: bool, boundary_itemsize: int) -> int:
    """Bytes of the calibration's memmap files (0 when they stay in RAM)."""
    from .gemq.stats import DEFAULT_RAM_LIMIT, stats_bytes
    from .gemq.streaming import DEFAULT_BOUNDARY_LIMIT
    xg = stats_bytes(len(shape.moe_layers), n_tokens, shape.hidden)
    spill = xg if xg > DEFAULT_RAM_LIMIT else 0
    if streamed:
        bounds = (shape.n_layers + 1) * n_tokens * shape.hidden * boundary_itemsize
        spill += bounds if bounds > DEFAULT_BOUNDARY_LIMIT else 0
    return spill


def check_disk(needs: Sequence[DiskNeed]) -> None:
    """Every filesystem has room for what the run writes there, else a one-line error before any work."""
    by_fs: dict[int, list[DiskNeed]] = {}
    for n in needs:
        by_fs.setdefault(_filesystem(n.path), []).append(n)
    for group in by_fs.values():
        need = sum(n.size for n in group) + MARGIN
        free = free_bytes(group[0].path)
        if need > free:
            parts = ", ".join(f"{n.what} {_gib(n.size)}" for n in group if n.size)
            raise GemqError(f"not enough free disk on {group[0].path}: the conversion needs {need:,} bytes "
                            f"({parts}, margin {_gib(MARGIN)}) and {free:,} ({_gib(free)}) are free.",
                            "pass --work-dir (and/or -o) on a disk with more room, or free disk space.")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def run_needs(model_dir: Path, tensors: dict[str, tuple[int, ...]], config: Any, shape: MoeShape, *, outtype: str,
              tied_output: bool, work_dir: Path, output_dir: Path | None, expert_types: Sequence[str],
              other_types: Sequence[str], calib: tuple[int, str] | None, verify_tokens: int,
              cache_dir: Path | None = None) -> list[DiskNeed]:
    """What a run writes where (`output_dir` None: no output, `--dry-run`). `calib`: (tokens, `--calib-memory`) when the run calibrates, else None;
    `verify_tokens`: tokens the verification scores (0: no verification); `cache_dir`: the statistics
    cache when it is on and the writer persists the experts it quantizes (up to `quant_store.STORE_LIMIT`)."""
    tokenizer = sum(f.stat().st_size for f in model_dir.glob("tokenizer*") if f.is_file())
    needs = [DiskNeed("float GGUF", work_dir, float_gguf_bytes(tensors, outtype, tied_output) + tokenizer)]
    if output_dir is not None:
        needs.append(DiskNeed("output (upper bound)", output_dir,
                              output_bound(tensors, shape, expert_types, other_types)))
    if calib is not None:
        import torch

        from .gemq.stats import calibration_dtype
        from .gemq.streaming import use_streaming
        n_tokens, memory = calib
        itemsize = torch.empty(0, dtype=calibration_dtype(config)).element_size()
        needs.append(DiskNeed("calibration spill files", work_dir,
                              calibration_spill(shape, n_tokens, use_streaming(model_dir, memory), itemsize)))
    if cache_dir is not None and output_dir is not None:
        from .gemq.quant_store import STORE_LIMIT
        needs.append(DiskNeed("statistics cache: quantized experts", _existing(cache_dir),
                              min(expert_bound(tensors, shape, expert_types), STORE_LIMIT)))
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    needs.append(DiskNeed("verification log-probs", work_dir, verify_tokens * vocab * 2))
    return needs


def _existing(path: Path) -> Path:
    """`path` or its nearest existing parent (the cache folder is made on first use)."""
    path = path.expanduser().absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path
