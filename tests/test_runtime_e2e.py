"""End to end through llama-cpp-python: GGUF files whose experts are stored as typed groups + qmap.

For tiny random HF MoE models (converted to an F32 GGUF by llama.cpp's converter), the expert
tensors are re-written with gguf-py (`rewrite_experts` below):
  * uniform  - stock layout, every expert Q4_K
  * split    - the SAME Q4_K expert bytes split into 3 groups (expert e -> group e % 3) + qmap
  * mixed    - groups of Q2_K / Q4_K / Q6_K (expert e -> group e % 3)
  * *_deq    - reference: F32 file whose experts are the dequantized weights of that file
Everything but the routed experts stays F32, so a file and its *_deq reference differ only by the
expert quantization that llama.cpp does on activations (Q8_K); the F32 path of llama.cpp matches HF to
~3e-6 with an F32 KV cache, so *_deq is the "HF reference with the same dequantized
weights".
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gemq_gguf import runtime
from gemq_gguf.convert.writer import copy_metadata
from gemq_gguf.evaluate import kld_vs_logits
from gemq_gguf.ggml import lib, quant
from gemq_gguf.ggml.layout import expert_qmap, group_tensor_name, qmap_name
from gemq_gguf.ggml.names import EXPERT_RE

ARCHS_EXACT = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2"]
ARCHS_MIXED = ["mixtral", "qwen2_moe"]
N_TOKENS = 48
N_DECODE = 6

pytestmark = pytest.mark.slow


def _require_patched() -> None:
    if not lib.is_patched():
        pytest.skip("the installed llama-cpp-python is not the patched build (run python cpp_patch/build.py)")


# ------------------------------------------------------------------ GGUF helpers (gguf-py only)

_QCACHE: dict[tuple[str, int, str], np.ndarray] = {}


def _quant_expert(src: Path, name: str, e: int, w: np.ndarray, t: str) -> np.ndarray:
    key = (f"{src}:{name}", e, t)
    if key not in _QCACHE:
        _QCACHE[key] = quant.quantize(np.ascontiguousarray(w, dtype=np.float32), t)
    return _QCACHE[key]


def rewrite_experts(src: Path, dst: Path, group_types: list[str], group_of=lambda e: e % 3,
                    dequantized: bool = False) -> Path:
    """Re-write the routed experts of an F32 GGUF: group g holds the experts with group_of(e) == g,
    quantized to group_types[g]. One group -> stock tensor name. dequantized -> F32 reference."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    writer = gguf.GGUFWriter(str(dst), arch)
    copy_metadata(reader, writer)
    if not dequantized:
        writer.add_uint32("gemq.version", 1)
    for t in reader.tensors:
        data = np.asarray(t.data)
        if not EXPERT_RE.match(t.name):
            writer.add_tensor(t.name, data, raw_dtype=t.tensor_type if data.dtype == np.uint8 else None)
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
        n_exp, n_out, n_in = data.shape
        G = len(group_types)
        members = [[e for e in range(n_exp) if (group_of(e) if G > 1 else 0) == g] for g in range(G)]
        q = {e: _quant_expert(src, t.name, e, data[e], group_types[g]) for g in range(G) for e in members[g]}
        if dequantized:
            deq = np.stack([quant.dequantize(q[e], group_types[g], n_in)
                            for e in range(n_exp) for g in range(G) if e in members[g]])
            writer.add_tensor(t.name, deq.reshape(n_exp, n_out, n_in).astype(np.float32))
        elif G == 1:
            writer.add_tensor(t.name, np.stack([q[e] for e in range(n_exp)]),
                              raw_dtype=gguf.GGMLQuantizationType[group_types[0]])
        else:
            for g in range(G):
                writer.add_tensor(group_tensor_name(t.name, g), np.stack([q[e] for e in members[g]]),
                                  raw_dtype=gguf.GGMLQuantizationType[group_types[g]])
            writer.add_tensor(qmap_name(t.name), expert_qmap(members, n_exp))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


# ------------------------------------------------------------------ llama.cpp helpers

def _tokens(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 384, size=n)]


def llama_logits(path: Path) -> np.ndarray:
    """Logits of a prefill of N_TOKENS tokens, then N_DECODE single-token decode steps (F32 KV cache)."""
    from llama_cpp import Llama
    toks = _tokens(N_TOKENS + N_DECODE)
    llm = Llama(model_path=str(path), n_ctx=128, n_batch=64, logits_all=True, n_threads=2,
                type_k=0, type_v=0, verbose=False)
    llm.eval(toks[:N_TOKENS])
    for t in toks[N_TOKENS:]:
        llm.eval([t])
    out = np.array(llm.scores[: len(toks)], dtype=np.float64)
    llm.close()
    return out


def kld_top1(ref: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    c = kld_vs_logits(test, ref)
    return c.kld_mean, c.same_top_p


@pytest.fixture(scope="module")
def f32_models(tmp_path_factory: pytest.TempPathFactory):
    """arch -> F32 GGUF of a tiny random model (built lazily, once per module)."""
    _require_patched()
    from tiny_models import make_tiny_model

    from gemq_gguf.convert.hf_to_gguf import hf_to_float_gguf

    root = tmp_path_factory.mktemp("runtime_e2e")
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            hf = make_tiny_model(arch, root / f"{arch}-hf")
            cache[arch] = hf_to_float_gguf(hf, root / f"{arch}-f32.gguf", "f32")
        return cache[arch]
    return get


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("arch", ARCHS_EXACT)
def test_split_groups_identical_logits(arch: str, f32_models) -> None:
    assert_split_groups_exact(f32_models(arch), arch)


def assert_split_groups_exact(src: Path, name: str) -> None:
    """Same Q4_K bytes, stock tensor vs 3 groups + qmap: identical logits (prefill and decode)."""
    uniform = rewrite_experts(src, src.with_name(f"{name}-uniform.gguf"), ["Q4_K"])
    split = rewrite_experts(src, src.with_name(f"{name}-split.gguf"), ["Q4_K"] * 3)
    a, b = llama_logits(uniform), llama_logits(split)
    assert np.isfinite(a).all() and np.abs(a).max() > 0
    rel = float(np.abs(a - b).max() / np.abs(a).max())
    assert rel <= 1e-6, f"{name}: max relative logit difference {rel:.3e}"


@pytest.mark.parametrize("arch", ARCHS_MIXED)
def test_mixed_file_matches_its_reference(arch: str, f32_models) -> None:
    """A Q2_K/Q4_K/Q6_K file is no further from its dequantized reference than a uniform Q4_K file."""
    src = f32_models(arch)
    files = {}
    for label, types in (("uniform", ["Q4_K"]), ("mixed", ["Q2_K", "Q4_K", "Q6_K"])):
        files[label] = rewrite_experts(src, src.with_name(f"{arch}-{label}.gguf"), types)
        files[label + "_deq"] = rewrite_experts(src, src.with_name(f"{arch}-{label}-deq.gguf"), types, dequantized=True)
    logits = {k: llama_logits(v) for k, v in files.items()}
    kld_u, top1_u = kld_top1(logits["uniform_deq"], logits["uniform"])
    kld_m, top1_m = kld_top1(logits["mixed_deq"], logits["mixed"])
    # sanity: the mixed file really differs from the uniform one (the Q2_K/Q6_K groups are used)
    kld_mu, _ = kld_top1(logits["uniform"], logits["mixed"])
    print(f"{arch}: uniform vs own ref KLD {kld_u:.2e} top1 {top1_u:.3f}; mixed vs own ref KLD {kld_m:.2e} "
          f"top1 {top1_m:.3f}; mixed vs uniform KLD {kld_mu:.2e}")
    assert kld_mu > 10 * max(kld_m, 1e-9)
    assert kld_m <= 1.5 * kld_u + 1e-4, (kld_m, kld_u)
    assert top1_m >= top1_u - 0.05, (top1_m, top1_u)


def _stock_lib_dir() -> Path | None:
    env = os.environ.get("GEMQ_STOCK_LLAMA_LIB")
    cands = [Path(env)] if env else [runtime.home() / "stock-lib"]
    for d in cands:
        if (d / "libllama.so").exists() and not lib.is_patched(d):
            return d
    return None


def test_unpatched_llama_cpp_refuses_mixed_file(f32_models) -> None:
    """Stock llama.cpp must refuse a grouped file cleanly (no crash, no garbage)."""
    src = f32_models("mixtral")
    mixed = rewrite_experts(src, src.with_name("mixtral-mixed-refuse.gguf"), ["Q2_K", "Q4_K", "Q6_K"])
    code = ("import sys, llama_cpp\n"
            "try:\n    llama_cpp.Llama(model_path=sys.argv[1], verbose=True)\n"
            "except ValueError as e:\n    print('REFUSED', e); sys.exit(3)\n"
            "print('LOADED'); sys.exit(0)\n")
    env = dict(os.environ)
    stock = _stock_lib_dir()
    if stock is not None:   # a real stock build of the same llama.cpp
        env["LLAMA_CPP_LIB_PATH"] = str(stock)
    else:                   # the patched build with its loader hook switched off == stock loader
        env["GEMQ_GGUF_DISABLE"] = "1"
    res = subprocess.run([sys.executable, "-c", code, str(mixed)], capture_output=True, text=True, env=env, timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 3 and "REFUSED" in res.stdout, log[-3000:]
    assert any(m in log for m in ("not found", "missing tensor", "wrong number of tensors")), log[-3000:]


def _logits_in_subprocess(path: Path, out: Path, **env: str) -> np.ndarray:
    """llama_logits in a fresh process (the runtime reads GEMQ_GGUF_* once per process)."""
    code = ("import sys, pathlib, numpy as np\n"
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from test_runtime_e2e import llama_logits\n"
            "np.save(sys.argv[2], llama_logits(pathlib.Path(sys.argv[1])))\n")
    res = subprocess.run([sys.executable, "-c", code, str(path), str(out)], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return np.load(out)


@pytest.mark.parametrize("arch", ARCHS_MIXED)
def test_in_place_groups_match_composition(arch: str, f32_models) -> None:
    """CPU: groups writing their slots in place == masked per-group products summed (GEMQ_GGUF_SPLIT_GROUPS)."""
    src = f32_models(arch)
    mixed = rewrite_experts(src, src.with_name(f"{arch}-mixed-inplace.gguf"), ["Q2_K", "Q4_K", "Q6_K"])
    a = _logits_in_subprocess(mixed, src.with_name(f"{arch}-inplace.npy"))
    b = _logits_in_subprocess(mixed, src.with_name(f"{arch}-split.npy"), GEMQ_GGUF_SPLIT_GROUPS="1")
    assert np.isfinite(a).all() and np.abs(a).max() > 0
    rel = float(np.abs(a - b).max() / np.abs(a).max())
    assert rel <= 1e-6, f"{arch}: max relative logit difference {rel:.3e}"
