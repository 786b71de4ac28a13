"""Where the (patched) llama.cpp build put its pieces: converter, tools, libraries, source.

`cpp_patch/build.py` records them in `${GEMQ_GGUF_HOME:-~/.cache/gemq-gguf}/llama.cpp/PATHS.json`
(keys `converter_dir`, `bin_dir`, `lib_dir`, `src_dir`); environment variables override single paths.
The installed llama-cpp-python's own libraries are found by `ggml.lib`.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import GemqError


def home() -> Path:
    """Cache root for downloads, builds and the demo model."""
    return Path(os.environ.get("GEMQ_GGUF_HOME", Path.home() / ".cache" / "gemq-gguf"))


def _paths() -> dict[str, str]:
    f = home() / "llama.cpp" / "PATHS.json"
    return json.loads(f.read_text()) if f.exists() else {}


def _path(key: str, env: str) -> Path:
    value = os.environ.get(env) or _paths().get(key)
    if not value:
        raise GemqError(f"the llama.cpp build is missing ({key} unknown).",
                        f"run ./setup.sh (or python cpp_patch/build.py), or set {env}.")
    return Path(value)


def converter_dir() -> Path:
    """Folder holding llama.cpp's convert_hf_to_gguf.py and its `conversion` package."""
    return _path("converter_dir", "GEMQ_CONVERTER_DIR")


def import_converter() -> Any:
    """llama.cpp's `conversion` package (the converter's model classes and tensor naming)."""
    d = converter_dir()
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    try:
        import conversion  # type: ignore[import-not-found]
    except ImportError as e:
        raise GemqError(f"llama.cpp's converter could not be imported from {d} ({e}).",
                        "run ./setup.sh, which installs it next to the patched runtime.") from None
    return conversion


def bin_path(name: str) -> Path:
    """A built llama.cpp tool (llama-perplexity, llama-bench, ...)."""
    p = _path("bin_dir", "GEMQ_LLAMA_BIN_DIR") / name
    if not p.exists():
        raise GemqError(f"{p} does not exist.", "run ./setup.sh to build the llama.cpp tools.")
    return p


def lib_dir() -> Path:
    """Folder holding the shared libraries built with the tools (libllama, libggml*)."""
    return _path("lib_dir", "GEMQ_LLAMA_LIB_DIR")


def src_dir() -> Path:
    """The patched llama.cpp source tree the tools were built from."""
    return _path("src_dir", "GEMQ_LLAMA_SRC_DIR")


def build_info() -> dict[str, str]:
    """The llama.cpp pin as built: llama-cpp-python version, backend and the stamp (a hash of our patches,
    the version and the build settings), for reports; empty before ./setup.sh."""
    return {k: v for k, v in _paths().items() if k in ("version", "backend", "stamp")}
