"""Where llama-cpp-python's ggml libraries are, and whether they carry our patch (standard library only:
`cpp_patch/build.py` uses this before anything else is installed)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from functools import cache
from pathlib import Path

#: exported by the patched libggml-base only (cpp_patch/patches/0001-ggml-expert-groups-mul-mat-id.patch)
MARKER_SYMBOL = "ggml_mul_mat_id_set_masked"
GGML_BASE_NAMES = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")


def llama_cpp_lib_dir() -> Path | None:
    """`llama_cpp/lib` of the installed llama-cpp-python (found without importing it), or None."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def ggml_base_file(lib_dir: Path) -> Path | None:
    """libggml-base in `lib_dir` under its platform's name, or None."""
    return next((lib_dir / n for n in GGML_BASE_NAMES if (lib_dir / n).exists()), None)


@cache
def _has_marker(lib_file: str, mtime_ns: int, size: int) -> bool:
    # read the file rather than dlopen it: dlopen returns an already loaded library of the same name.
    # Keyed by mtime and size too, so a rebuild in the same process is seen.
    return MARKER_SYMBOL.encode() in Path(lib_file).read_bytes()


def is_patched(lib_dir: Path | None = None) -> bool:
    """True when llama-cpp-python's libggml-base (or the one in `lib_dir`) has the expert-group patch.

    Only such a build runs GGUF files whose experts carry different types (grouped tensors + qmap);
    stock llama.cpp refuses them at load time.
    """
    d = lib_dir if lib_dir is not None else llama_cpp_lib_dir()
    f = ggml_base_file(d) if d is not None else None
    if f is None:
        return False
    st = f.stat()
    return _has_marker(str(f), st.st_mtime_ns, st.st_size)


def dist_version(name: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
