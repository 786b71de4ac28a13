"""What the JSON report records so that a run can be reproduced and its inputs recognised later.

Options, seed and calibration settings come from the request itself; besides them: the code (git
describe of this source tree, else the package version), the llama.cpp pin (llama-cpp-python version and
the build stamp, a hash of our patches and build settings), the library versions that feed the numbers,
and the identity of every input: content hashes of the checkpoint's small files and its safetensors
headers (tensor names, dtypes, offsets), shard sizes and mtimes (hashing tens of GB of weights would cost
minutes), and content hashes of the calibration texts, imatrix and plan files.
"""
from __future__ import annotations

import hashlib
import os
import platform
import struct
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .ggml.lib import dist_version
from .options import ConvertRequest
from .runtime import build_info

_SMALL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt", "special_tokens_map.json")
_LIBRARIES = ("gemq-gguf", "torch", "transformers", "numpy", "gguf", "llama_cpp_python", "safetensors", "tokenizers")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def code_version() -> str:
    """`git describe --always --dirty` of this source tree, else the installed package version."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty", "--tags"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return f"git {out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return f"gemq-gguf {dist_version('gemq-gguf')}"


def _safetensors_header_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return hashlib.sha256(f.read(n)).hexdigest()


def checkpoint_identity(model_dir: Path) -> dict[str, Any]:
    """Content hashes of the small files and shard headers, and each shard's size and mtime."""
    return {
        "files": {n: sha256_file(model_dir / n) for n in _SMALL_FILES if (model_dir / n).is_file()},
        "shards": [{"name": f.name, "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns,
                    "header_sha256": _safetensors_header_sha256(f)}
                   for f in sorted(model_dir.glob("*.safetensors"))],
    }


def calibration_identity(texts: tuple[str, ...]) -> list[dict[str, Any]]:
    """Name, weight and content hash of each calibration source (the packaged mix when none is given)."""
    from .gemq.calib import load_sources
    return [{"name": s.name, "weight": s.weight, "sha256": hashlib.sha256(s.text.encode("utf-8")).hexdigest()}
            for s in load_sources(texts or None)]


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(l.split(":", 1)[1].strip() for l in lines if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def environment() -> dict[str, Any]:
    """What the bytes may depend on beyond the inputs: the CPU's instruction set (MKL picks its code path
    by it), torch's threads (no effect under MKL_CBWR's strict mode, recorded to show it), the OS."""
    import torch
    return {"machine": platform.machine(), "cpu": _cpu_model(), "system": platform.platform(),
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "MKL_CBWR": os.environ.get("MKL_CBWR")}


def provenance(req: ConvertRequest, model_dir: Path) -> dict[str, Any]:
    """Everything besides the input files that the report needs to reproduce this run."""
    files = {"imatrix": req.calib.imatrix, "plan": getattr(req.experts, "path", None)}
    return {
        "request": asdict(req),
        "code": code_version(),
        "llama_cpp": build_info(),
        "libraries": {d: dist_version(d) for d in _LIBRARIES},
        "environment": environment(),
        "checkpoint": checkpoint_identity(model_dir),
        "calibration_texts": calibration_identity(req.calib.texts),
        "input_files": {k: {"path": str(p), "sha256": sha256_file(p)} for k, p in files.items()
                        if p is not None and Path(p).is_file()},
    }
