"""Where the (patched) llama.cpp pieces live: converter, tools, libraries.

`cpp_patch/build.py` records them in `${GEMQ_GGUF_HOME:-~/.cache/gemq-gguf}/llama.cpp/PATHS.json`
(keys `converter_dir`, `bin_dir`, `lib_dir`, `src_dir`); environment variables override single paths.
"""
from __future__ import annotations

import importlib.util
import json
import os
from functools import cache
from pathlib import Path

from .errors import GemqError


def home() -> Path:
    """Cache root for downloads, builds and the demo model."""
    return Path(os.environ.get("GEMQ_GGUF_HOME", Path.home() / ".cache" / "gemq-gguf"))


#: exported by the patched libggml-base only (cpp_patch/patches/0001-ggml-expert-groups-mul-mat-id.patch)
MARKER_SYMBOL = "ggml_mul_mat_id_set_masked"


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


def llama_cpp_lib_dir() -> Path | None:
    """`llama_cpp/lib` of the installed llama-cpp-python (found without importing it), or None."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


@cache
def _has_marker(lib_file: str) -> bool:
    # read the file rather than dlopen it: dlopen returns an already loaded library of the same name
    try:
        return MARKER_SYMBOL.encode() in Path(lib_file).read_bytes()
    except OSError:
        return False


def is_patched(lib: Path | None = None) -> bool:
    """True when llama-cpp-python's libggml-base (or the one in `lib`) has the expert-group patch.

    Only such a build runs GGUF files whose experts carry different types (grouped tensors + qmap);
    stock llama.cpp refuses them at load time.
    """
    d = lib if lib is not None else llama_cpp_lib_dir()
    if d is None:
        return False
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (d / name).exists():
            return _has_marker(str(d / name))
    return False


def require_patched() -> None:
    """Raise GemqError unless the installed llama-cpp-python is the patched build."""
    if not is_patched():
        raise GemqError("the installed llama-cpp-python is not the gemq-patched build, so it cannot run "
                        "files with per-expert quant types.",
                        "run python cpp_patch/build.py (or ./setup.sh), or write a stock-compatible file.")
