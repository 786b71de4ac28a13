"""Host buffers of calibration records: in RAM, or in memmap files in a fresh work directory past a limit."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, path: Path | None) -> torch.Tensor:
    """A zeroed CPU tensor, in RAM or backed by a memmap file (bf16 stored as uint16 bits)."""
    if path is None:
        return torch.zeros(shape, dtype=dtype)
    np_dtype = np.uint16 if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
    with path.open("wb") as fh:  # reserve the blocks now: a full disk is an ENOSPC here, not a SIGBUS later
        os.posix_fallocate(fh.fileno(), 0, int(np.prod(shape)) * np.dtype(np_dtype).itemsize)
    arr = np.memmap(path, dtype=np_dtype, mode="r+", shape=shape)
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def spill_directory(work_dir: Path | None, prefix: str) -> Path:
    """A fresh directory under `work_dir` (the system temp dir when None)."""
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=work_dir))
