"""What a cached calibration or cost table depends on, hashed into the names of its cache entries.

The checkpoint's part of the key is cheap on purpose: hashing every byte of a 60 GB model runs at disk
speed (a minute or more per run, about as long as the cached run itself). Instead the key hashes
- every file's name and size, and small files (config, tokenizer, index: under 1 MiB) whole;
- each safetensors shard's header whole: every tensor's name, dtype, shape and byte range;
- 64 samples of 4 KiB spread evenly over every large file.
Another model, a re-export or a different dtype changes names, sizes or headers; a fine-tune saved with the
same layout changes essentially every weight, so it changes the samples too. What the key cannot see is an
edit confined to bytes no sample touches: use `--no-cache` (or delete the entry) for such a checkpoint.
The calibration text enters as the calibration tokens themselves (text files, weights, token count,
sequence length, seed and tokenizer all reduce to them), and the code as a hash of the sources that
compute statistics and costs plus ggml's quantizer library.
"""
from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: bump when the layout of cache entries changes
FORMAT = 2
SMALL_FILE = 2**20
SAMPLES, SAMPLE_BYTES = 64, 4096
_CODE_DIRS = ("gemq", "archs", "ggml")


def digest(*parts: Any) -> str:
    """sha256 of JSON-able parts and byte strings, in order."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _file_digest(path: Path, h: "hashlib._Hash", named: bool = True) -> None:
    size = path.stat().st_size
    h.update(f"{path.name if named else ''}:{size}\0".encode())
    with path.open("rb") as f:
        if size <= SMALL_FILE:
            h.update(f.read())
            return
        if path.suffix == ".safetensors":
            n = int.from_bytes(f.read(8), "little")
            if 0 < n < size:
                h.update(f.read(n))
        for i in range(SAMPLES):
            f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
            h.update(f.read(SAMPLE_BYTES))


def file_fingerprint(path: Path) -> str:
    """One file's part of a key, whatever its name: size and samples (a small file whole)."""
    h = hashlib.sha256()
    _file_digest(Path(path), h, named=False)
    return h.hexdigest()


def checkpoint_fingerprint(model_dir: Path) -> str:
    """The checkpoint's part of the key (see the module docstring for what it sees)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).iterdir() if p.is_file()):
        _file_digest(path, h)
    return h.hexdigest()


@cache
def code_version() -> str:
    """Hash of the sources that compute statistics and costs (gemq/, archs/, ggml/), the ggml library that
    quantizes, and the torch / transformers versions."""
    import transformers

    from ..ggml.lib import ggml_base_file, llama_cpp_lib_dir
    h = hashlib.sha256(f"{FORMAT}:{torch.__version__}:{transformers.__version__}".encode())
    root = Path(__file__).resolve().parent.parent
    for d in _CODE_DIRS:
        for f in sorted((root / d).glob("*.py")):
            h.update(f.name.encode() + f.read_bytes())
    lib_dir = llama_cpp_lib_dir()
    lib = ggml_base_file(lib_dir) if lib_dir is not None else None
    if lib is not None:
        h.update(lib.read_bytes())
    return h.hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """Hash of a CPU tensor's shape, dtype and values."""
    return digest(list(t.shape), str(t.dtype), t.contiguous().numpy().tobytes())


def arrays_digest(arrays: dict[str, np.ndarray] | None) -> str:
    """Hash of named arrays (e.g. an imatrix's means), independent of insertion order."""
    h = hashlib.sha256()
    for name in sorted(arrays or {}):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype}:{a.shape}\0".encode() + a.tobytes())
    return h.hexdigest()
