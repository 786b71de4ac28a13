#!/usr/bin/env python3
"""Build the gemq-patched llama.cpp: CLI tools + the llama-cpp-python package (stdlib only).

    python cpp_patch/build.py [--cuda | --metal] [--src LLAMA_CPP_CHECKOUT] [--prefix DIR] [--jobs N]
    python cpp_patch/build.py --check      # is the installed llama_cpp the patched one?

Steps (each skipped when up to date; the stamp hashes patches + options + version):
  1. get the llama-cpp-python 0.3.36 sdist (pip download, cached under $GEMQ_GGUF_HOME/dl) and
     extract it, or use --src (a llama.cpp checkout at the same commit, patched in place);
  2. apply cpp_patch/patches/*.patch with `patch -p1` (fails loudly, showing the rejected hunk);
  3. compile llama.cpp ONCE with CMake (shared libs + tools; ccache when available);
  4. install llama-cpp-python's Python code with -DLLAMA_BUILD=OFF (no second compile) and copy
     the freshly built shared libraries into its llama_cpp/lib;
  5. install the sdist's gguf-py, copy convert_hf_to_gguf.py + conversion/ and write PATHS.json.

Everything lands in $GEMQ_GGUF_HOME/llama.cpp (default ~/.cache/gemq-gguf/llama.cpp):
  bin/ (tools + shared libs), convert_hf_to_gguf.py, conversion/, PATHS.json, STAMP.json.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}"
HERE = Path(__file__).resolve().parent
PATCH_DIR = HERE / "patches"
TOOLS = ["llama-perplexity", "llama-completion", "llama-bench", "llama-quantize", "llama-imatrix", "test-backend-ops"]
LIB_GLOBS = ["lib*.so*", "lib*.dylib"]  # libllama, libggml*, libllama-common, tool impl libraries
sys.path.insert(0, str(HERE.parent))  # the project's standard-library-only lookup of the patched ggml
from gemq_gguf.ggml.lib import dist_version, is_patched  # noqa: E402


def home() -> Path:
    return Path(os.environ.get("GEMQ_GGUF_HOME", Path.home() / ".cache" / "gemq-gguf")).expanduser()


def log(msg: str) -> None:
    print(f"[gemq build {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], cwd: Path | None = None, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, check=check)


def patches() -> list[Path]:
    ps = sorted(PATCH_DIR.glob("*.patch"))
    if not ps:
        sys.exit(f"no patches found in {PATCH_DIR}")
    return ps


def sha256_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- source

def fetch_sdist() -> Path:
    """The sdist tarball, downloaded once with pip into $GEMQ_GGUF_HOME/dl."""
    dl = home() / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    tgz = dl / f"{SDIST}.tar.gz"
    if not tgz.exists():
        run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             f"llama-cpp-python=={VERSION}", "-d", dl])
    if not tgz.exists():
        sys.exit(f"pip download did not produce {tgz}")
    return tgz


def patch_cmd(llama_dir: Path, patch: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["patch", "-p1", "--forward", "--batch", *extra, "-i", str(patch)],
                          cwd=llama_dir, capture_output=True, text=True)


def apply_patches(llama_dir: Path) -> None:
    """Apply every patch with patch -p1; dry-run first so a failure leaves the tree untouched."""
    applied = llama_dir / ".gemq-applied"
    ps = patches()
    for p in ps:
        # a patch that reverses cleanly is already applied (checked first: pure insertions would
        # otherwise apply a second time)
        # (--force, not --batch: with --batch, patch silently flips an unapplied patch and succeeds)
        rev = subprocess.run(["patch", "-p1", "-R", "--force", "--dry-run", "-i", str(p)],
                             cwd=llama_dir, capture_output=True, text=True)
        if rev.returncode == 0:
            log(f"{p.name}: already applied")
            continue
        dry = patch_cmd(llama_dir, p, "--dry-run")
        if dry.returncode != 0:
            print(dry.stdout, dry.stderr, file=sys.stderr)
            sys.exit(f"patch {p.name} does not apply to {llama_dir} (see the failed hunk above); "
                     f"is this llama.cpp the commit vendored in llama-cpp-python {VERSION}?")
        res = patch_cmd(llama_dir, p)
        if res.returncode != 0:
            print(res.stdout, res.stderr, file=sys.stderr)
            sys.exit(f"patch {p.name} failed")
        log(f"{p.name}: applied")
    applied.mkdir(exist_ok=True)
    for old in applied.glob("*.patch"):
        old.unlink()
    for p in ps:
        shutil.copy2(p, applied / p.name)


def unapply_old_patches(llama_dir: Path) -> bool:
    """Reverse the applied patches from the first one that changed onwards.

    Patches before it stay applied, so their files keep their mtimes and ninja rebuilds only what the
    changed or added patches touch (adding a patch at the end reverses nothing)."""
    applied = llama_dir / ".gemq-applied"
    old = sorted(applied.glob("*.patch"))
    new = {p.name: p.read_bytes() for p in patches()}
    keep = 0
    while keep < len(old) and new.get(old[keep].name) == old[keep].read_bytes():
        keep += 1
    for p in reversed(old[keep:]):
        res = subprocess.run(["patch", "-p1", "-R", "--force", "-i", str(p)], cwd=llama_dir,
                             capture_output=True, text=True)
        if res.returncode != 0:
            log(f"could not reverse {p.name}; re-extracting the source")
            return False
        p.unlink()
    return True


def prepare_sdist_source(patch_hash: str) -> tuple[Path, Path]:
    """Extract the sdist once under $GEMQ_GGUF_HOME/src and bring it to the current patch set."""
    src_root = home() / "src"
    pkg_dir = src_root / SDIST
    llama_dir = pkg_dir / "vendor" / "llama.cpp"
    stamp = pkg_dir / ".gemq-patch-hash"
    if stamp.exists() and stamp.read_text() == patch_hash:
        return pkg_dir, llama_dir
    if pkg_dir.exists() and not unapply_old_patches(llama_dir):
        shutil.rmtree(pkg_dir)
    if not pkg_dir.exists():
        tgz = fetch_sdist()
        log(f"extracting {tgz}")
        src_root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tgz) as tf:
            tf.extractall(src_root)
    apply_patches(llama_dir)
    stamp.write_text(patch_hash)
    return pkg_dir, llama_dir


# ---------------------------------------------------------------- build

def cmake_args(backend: str) -> list[str]:
    args = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF",
            "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=OFF",
            # tools and libraries live side by side in bin/
            "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN" if sys.platform != "darwin"
            else "-DCMAKE_INSTALL_RPATH=@loader_path"]
    if backend == "cuda":
        args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('CUDA_ARCHS', '90')}"]
    elif backend == "metal":
        args += ["-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"]
    if shutil.which("ccache"):
        args += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
        if backend == "cuda":
            args += ["-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
    return args


def build_llama(llama_dir: Path, build_dir: Path, backend: str, jobs: int) -> Path:
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    build_dir.mkdir(parents=True, exist_ok=True)
    run(["cmake", "-S", llama_dir, "-B", build_dir, *gen, *cmake_args(backend)])
    run(["cmake", "--build", build_dir, "--config", "Release", "-j", str(jobs),
         "--target", *TOOLS, "llama", "ggml"])
    return build_dir / "bin"


def replace_file(src: Path, dst: Path) -> None:
    """Copy through a temporary name and rename: a running process keeps its mapped old copy intact."""
    tmp = dst.with_name(dst.name + ".gemq-tmp")
    shutil.copy2(src, tmp, follow_symlinks=True)
    os.replace(tmp, dst)


def install_outputs(bin_src: Path, prefix: Path) -> tuple[Path, list[Path]]:
    bin_dir = prefix / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for t in TOOLS:
        f = bin_src / t
        if not f.exists():
            sys.exit(f"build did not produce {f}")
        replace_file(f, bin_dir / t)
    libs: list[Path] = []
    for pattern in LIB_GLOBS:
        for f in sorted(bin_src.glob(pattern)):
            dst = bin_dir / f.name
            if f.is_symlink():
                if dst.exists() or dst.is_symlink():
                    dst.unlink()
                dst.symlink_to(os.readlink(f))
            else:
                replace_file(f, dst)
            libs.append(dst)
    return bin_dir, libs


def site_llama_cpp_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gguf_py_is_paired(llama_dir: Path) -> bool:
    """Is the importable gguf package the sdist's gguf-py (PyPI's 0.19.0 has the same version, older code)?"""
    spec = importlib.util.find_spec("gguf")
    if spec is None or spec.origin is None:
        return False
    mine = Path(spec.origin).parent
    theirs = llama_dir / "gguf-py" / "gguf"
    return all((mine / f).exists() and (mine / f).read_bytes() == (theirs / f).read_bytes()
               for f in ("constants.py", "gguf_writer.py", "quants.py"))


def install_python(get_pkg_dir, llama_dir: Path, lib_files: list[Path]) -> Path:
    """Install llama-cpp-python's Python code without compiling llama.cpp, then drop our libraries into it.

    When llama-cpp-python of the same version is already installed its Python code is identical, so
    only the libraries are replaced (no pip run)."""
    if dist_version("llama_cpp_python") != VERSION or site_llama_cpp_dir() is None:
        env = dict(os.environ, CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF", FORCE_CMAKE="1")
        run([sys.executable, "-m", "pip", "install", "--no-cache-dir", "numpy>=1.20", "typing-extensions>=4.5",
             "diskcache>=5.6.1", "jinja2>=2.11.3"])
        run([sys.executable, "-m", "pip", "install", "--no-cache-dir", "--no-deps", "--force-reinstall", get_pkg_dir()], env=env)
    if not gguf_py_is_paired(llama_dir):
        run([sys.executable, "-m", "pip", "install", "--no-cache-dir", "--no-deps", "--force-reinstall",
             llama_dir / "gguf-py"])
    pkg = site_llama_cpp_dir()
    if pkg is None:
        sys.exit("llama_cpp is not importable after pip install")
    lib_dir = pkg / "lib"
    lib_dir.mkdir(exist_ok=True)
    for f in lib_files:
        if not f.name.startswith(("libllama.", "libggml")):
            continue  # tool libraries are not needed by the Python package
        replace_file(f, lib_dir / f.name)
    return lib_dir


def copy_converter(llama_dir: Path, prefix: Path) -> Path:
    shutil.copy2(llama_dir / "convert_hf_to_gguf.py", prefix / "convert_hf_to_gguf.py")
    conv = prefix / "conversion"
    if conv.exists():
        shutil.rmtree(conv)
    shutil.copytree(llama_dir / "conversion", conv, ignore=shutil.ignore_patterns("__pycache__"))
    return prefix


# ---------------------------------------------------------------- check

def check() -> int:
    pkg = site_llama_cpp_dir()
    if pkg is None:
        print("llama_cpp: not installed")
        return 1
    patched = is_patched(pkg / "lib")
    print(f"llama_cpp at {pkg}: {'PATCHED (gemq expert groups)' if patched else 'NOT patched'}")
    paths = home() / "llama.cpp" / "PATHS.json"
    if paths.exists():
        info = json.loads(paths.read_text())
        print(f"tools: {info.get('bin_dir')}  converter: {info.get('converter_dir')}  stamp: {info.get('stamp', '')[:12]}")
    else:
        print(f"tools: not built ({paths} missing)")
    return 0 if patched else 1


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--cuda", action="store_true", help="build the CUDA backend (CUDA_ARCHS env, default 90)")
    g.add_argument("--metal", action="store_true", help="build the Metal backend (macOS; untested on hardware)")
    ap.add_argument("--src", type=Path, help="existing llama.cpp checkout at the vendored commit (patched in place)")
    ap.add_argument("--prefix", type=Path, help="install prefix (default $GEMQ_GGUF_HOME/llama.cpp)")
    ap.add_argument("--build-dir", type=Path, help="CMake build folder (default $GEMQ_GGUF_HOME/build-<backend>)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--no-python", action="store_true", help="do not (re)install llama-cpp-python / gguf-py")
    ap.add_argument("--force", action="store_true", help="ignore the stamp")
    ap.add_argument("--check", action="store_true", help="only report whether the installed llama_cpp is patched")
    a = ap.parse_args()
    if a.check:
        return check()

    t0 = time.time()
    backend = "cuda" if a.cuda else "metal" if a.metal else "cpu"
    prefix = (a.prefix or home() / "llama.cpp").expanduser().resolve()
    prefix.mkdir(parents=True, exist_ok=True)
    patch_hash = sha256_files(patches())
    stamp = hashlib.sha256(json.dumps({"patches": patch_hash, "backend": backend, "version": VERSION,
                                       "src": str(a.src.resolve()) if a.src else "sdist",
                                       "cmake": cmake_args(backend)}, sort_keys=True).encode()).hexdigest()
    stamp_file = prefix / "STAMP.json"
    old = json.loads(stamp_file.read_text()) if stamp_file.exists() else {}
    up_to_date = (not a.force and old.get("stamp") == stamp
                  and all((prefix / "bin" / t).exists() for t in TOOLS))
    python_ok = a.no_python or (site_llama_cpp_dir() is not None and is_patched(site_llama_cpp_dir() / "lib")
                                and old.get("python_stamp") == stamp)
    if up_to_date and python_ok:
        log(f"up to date ({prefix}); nothing to do")
        return 0

    if a.src:
        llama_dir = a.src.resolve()
        pkg_dir = None
        apply_patches(llama_dir)
    else:
        pkg_dir, llama_dir = prepare_sdist_source(patch_hash)

    build_dir = (a.build_dir.expanduser().resolve() if a.build_dir else
                 home() / f"build-{backend}" if not a.src else llama_dir / f"build-gemq-{backend}")
    if not up_to_date:
        t1 = time.time()
        bin_src = build_llama(llama_dir, build_dir, backend, a.jobs)
        log(f"llama.cpp build: {time.time() - t1:.0f} s")
    else:
        bin_src = build_dir / "bin"
    bin_dir, libs = install_outputs(bin_src, prefix)
    copy_converter(llama_dir, prefix)

    python_stamp = old.get("python_stamp", "")
    if not a.no_python:
        def get_pkg_dir() -> Path:
            if pkg_dir is not None:
                return pkg_dir
            # --src: the Python package still comes from the sdist (same version)
            d = home() / "src" / SDIST
            if not d.exists():
                with tarfile.open(fetch_sdist()) as tf:
                    tf.extractall(home() / "src")
            return d
        lib_dir = install_python(get_pkg_dir, llama_dir, libs)
        if not is_patched(lib_dir):
            sys.exit(f"installed llama_cpp at {lib_dir} is not the patched build")
        python_stamp = stamp

    info = {"converter_dir": str(prefix), "bin_dir": str(bin_dir), "lib_dir": str(bin_dir),
            "src_dir": str(llama_dir), "backend": backend, "version": VERSION, "stamp": stamp}
    (prefix / "PATHS.json").write_text(json.dumps(info, indent=2) + "\n")
    stamp_file.write_text(json.dumps({"stamp": stamp, "python_stamp": python_stamp, "backend": backend,
                                      "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    log(f"done in {time.time() - t0:.0f} s: tools in {bin_dir}, PATHS.json in {prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
