#!/usr/bin/env python3
"""Speed of the typed-expert-group dispatch (patched llama.cpp), llama-bench pp512 / tg128.

Writes four synthetic MoE GGUFs with Qwen3-30B-A3B layer shapes (hidden 2048, 128 experts, top-8,
expert FFN 768, head_dim 128, 32/4 heads; random weights, small vocab) and benchmarks them side by
side in ONE llama-bench run:
  (a) uniform  - stock layout, all experts Q4_K
  (b) grouped  - the SAME Q4_K bytes split into 3 groups per projection + qmap
  (c) mixed    - 3 groups of Q2_K / Q4_K / Q6_K (4.56 bpw vs 4.5 for Q4_K)
  (d) mixed3   - 3 groups of Q3_K / Q4_K / Q6_K (on CUDA: the kernel class that takes every type)
and prints a table with the ratios against (a) (target: b/a >= 0.97 tg128, >= 0.95 pp512).
Experts are numbered group by group, as the converter writes them (group g = the g-th third of the
experts); --expert-order interleaved (expert e -> group e % 3) makes the runtime read the map instead.
--split adds a second run with GEMQ_GGUF_SPLIT_GROUPS=1: the per-group composition instead of the
single grouped node (they differ only where a backend runs the grouped node, i.e. CUDA).

    python bench/dispatch_speed.py [--ngl 99] [--layers 8] [--reps 3] [--split] [--out DIR]

Needs the patched build (cpp_patch/build.py): llama-bench and libggml-base (for quantization) are
found through $GEMQ_GGUF_HOME/llama.cpp/PATHS.json, or --bin-dir / --lib-dir; gguf-py through
`import gguf` or <src_dir>/gguf-py. On a GPU machine bench/cuda_check.sh builds, checks and runs this.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's quantizer and grouped layout
from gemq_gguf.ggml.layout import expert_qmap, group_tensor_name, qmap_name  # noqa: E402
from gemq_gguf.ggml.quant import quantize  # noqa: E402

QK_K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q6_K")
VARIANT_TYPES = {"grouped": ["Q4_K"] * 3, "mixed": ["Q2_K", "Q4_K", "Q6_K"], "mixed3": ["Q3_K", "Q4_K", "Q6_K"]}


def paths_json() -> dict:
    home = Path(os.environ.get("GEMQ_GGUF_HOME", Path.home() / ".cache" / "gemq-gguf")).expanduser()
    f = home / "llama.cpp" / "PATHS.json"
    return json.loads(f.read_text()) if f.exists() else {}


def import_gguf(src_dir: str | None):
    if importlib.util.find_spec("gguf") is None:
        if not src_dir:
            raise ImportError("gguf is not installed and no llama.cpp source folder was given")
        sys.path.insert(0, str(Path(src_dir) / "gguf-py"))
    import gguf
    return gguf


def add_vocab(w, gguf, n_vocab: int) -> None:
    """A minimal SentencePiece-style vocab (llama-bench only needs token ids)."""
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    toks += [f"\u2581t{i}" for i in range(n_vocab - len(toks))]
    types = [2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([-float(i) for i in range(n_vocab)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


def write_model(path: Path, variant: str, a: argparse.Namespace, gguf, pools: dict, dense: dict) -> None:
    arch = "qwen3moe"
    Q8 = gguf.GGMLQuantizationType.Q8_0
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"gemq-dispatch-bench-{variant}")
    w.add_block_count(a.layers)
    w.add_context_length(4096)
    w.add_embedding_length(a.hidden)
    w.add_feed_forward_length(6144)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_key_length(a.head_dim)
    w.add_value_length(a.head_dim)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(a.experts)
    w.add_expert_used_count(a.top_k)
    w.add_expert_feed_forward_length(a.ffn)
    w.add_uint32("gemq.version", 1)
    add_vocab(w, gguf, a.vocab)

    w.add_tensor("token_embd.weight", dense["embd"], raw_dtype=Q8)
    w.add_tensor("output_norm.weight", dense["norm"])
    w.add_tensor("output.weight", dense["embd"], raw_dtype=Q8)
    E = a.experts
    groups = (np.array_split(np.arange(E), 3) if a.expert_order == "group-major" else
              [np.arange(g, E, 3) for g in range(3)])
    qmap = expert_qmap(groups, E)
    for il in range(a.layers):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", dense["norm"])
        w.add_tensor(p + "ffn_norm.weight", dense["norm"])
        w.add_tensor(p + "attn_q_norm.weight", dense["hnorm"])
        w.add_tensor(p + "attn_k_norm.weight", dense["hnorm"])
        w.add_tensor(p + "attn_q.weight", dense["q"], raw_dtype=Q8)
        w.add_tensor(p + "attn_k.weight", dense["kv"], raw_dtype=Q8)
        w.add_tensor(p + "attn_v.weight", dense["kv"], raw_dtype=Q8)
        w.add_tensor(p + "attn_output.weight", dense["o"], raw_dtype=Q8)
        w.add_tensor(p + "ffn_gate_inp.weight", dense["router"][il % len(dense["router"])])
        for proj in ("gate", "up", "down"):
            name = p + f"ffn_{proj}_exps.weight"
            # expert e uses pool slot (e * 7 + il) % P: identical statistics, distinct bytes per layer
            P = pools["Q4_K"][proj].shape[0]
            slots = (np.arange(E) * 7 + il) % P
            if variant == "uniform":
                w.add_tensor(name, pools["Q4_K"][proj][slots], raw_dtype=gguf.GGMLQuantizationType.Q4_K)
                continue
            types = VARIANT_TYPES[variant]
            for g, ids in enumerate(groups):
                w.add_tensor(group_tensor_name(name, g), pools[types[g]][proj][slots[ids]],
                             raw_dtype=gguf.GGMLQuantizationType[types[g]])
            w.add_tensor(qmap_name(name), qmap)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_models(a: argparse.Namespace, gguf, out: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    P = a.pool
    pools: dict[str, dict[str, np.ndarray]] = {t: {} for t in QK_K_TYPES}
    for proj in ("gate", "up", "down"):
        n_out, n_in = (a.hidden, a.ffn) if proj == "down" else (a.ffn, a.hidden)
        x = (rng.standard_normal((P * n_out, n_in), dtype=np.float32) * 0.02)
        for t in QK_K_TYPES:
            pools[t][proj] = quantize(x, t).reshape(P, n_out, -1)  # K-quants need no imatrix
    q8 = lambda r, c: gguf.quants.quantize(rng.standard_normal((r, c), dtype=np.float32) * 0.02,  # noqa: E731
                                           gguf.GGMLQuantizationType.Q8_0)
    qd = a.heads * a.head_dim
    kvd = a.kv_heads * a.head_dim
    dense = {"embd": q8(a.vocab, a.hidden), "q": q8(qd, a.hidden), "kv": q8(kvd, a.hidden), "o": q8(a.hidden, qd),
             "norm": np.ones(a.hidden, dtype=np.float32), "hnorm": np.ones(a.head_dim, dtype=np.float32),
             "router": [rng.standard_normal((a.experts, a.hidden), dtype=np.float32) * 0.5 for _ in range(4)]}
    files = []
    for variant in ("uniform", *VARIANT_TYPES):
        order = "" if variant == "uniform" or a.expert_order == "group-major" else "-interleaved"
        f = out / f"dispatch-{variant}-L{a.layers}{order}.gguf"
        if not f.exists() or a.regen:
            t0 = time.time()
            write_model(f.with_suffix(".tmp"), variant, a, gguf, pools, dense)
            f.with_suffix(".tmp").rename(f)
            print(f"wrote {f} ({f.stat().st_size / 2**30:.2f} GiB, {time.time() - t0:.0f} s)", flush=True)
        files.append(f)
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "gemq-dispatch-bench")
    ap.add_argument("--bin-dir", type=Path)
    ap.add_argument("--lib-dir", type=Path)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--pool", type=int, default=16, help="distinct random experts per projection (tiled)")
    ap.add_argument("--ngl", type=int, default=0, help="layers on the GPU (99 = all)")
    ap.add_argument("--threads", type=int, default=0, help="llama-bench -t (0 = its default)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("--expert-order", choices=("group-major", "interleaved"), default="group-major",
                    help="how the grouped files number their experts (group-major: as the converter writes)")
    ap.add_argument("--regen", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--gen-only", action="store_true", help="only write the GGUF files")
    ap.add_argument("--split", action="store_true",
                    help="also time the per-group composition (GEMQ_GGUF_SPLIT_GROUPS=1; differs from the default "
                         "only where a backend runs the single grouped node, i.e. CUDA)")
    a = ap.parse_args()

    info = paths_json()
    bin_dir = a.bin_dir or Path(info.get("bin_dir", ""))
    lib_dir = a.lib_dir or Path(info.get("lib_dir", bin_dir))
    bench = bin_dir / "llama-bench"
    if not bench.exists() and not a.gen_only:
        sys.exit(f"{bench} not found: build with cpp_patch/build.py or pass --bin-dir")
    gguf = import_gguf(info.get("src_dir"))
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GEMQ_GGML_LIB_DIR", str(lib_dir))  # the quantizer's libggml-base
    files = make_models(a, gguf, a.out)
    if a.gen_only:
        return 0

    cmd = [str(bench), "-p", str(a.n_prompt), "-n", str(a.n_gen), "-r", str(a.reps), "-ngl", str(a.ngl), "-o", "json"]
    if a.threads:
        cmd += ["-t", str(a.threads)]
    for f in files:
        cmd += ["-m", str(f)]
    tests = [f"pp{a.n_prompt}", f"tg{a.n_gen}"]
    labels = {"uniform": "(a) uniform Q4_K", "grouped": "(b) same Q4_K, 3 groups", "mixed": "(c) mixed Q2_K/Q4_K/Q6_K",
              "mixed3": "(d) mixed Q3_K/Q4_K/Q6_K"}
    runs = [("", {})]
    if a.split:
        # the per-group composition (masked mul_mat_id per group + adds) that the single grouped node replaces
        runs.append((", per-group nodes", {"GEMQ_GGUF_SPLIT_GROUPS": "1"}))
    all_rows = []
    for suffix, env in runs:
        print("$ " + " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(cmd), flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
        if res.returncode != 0:
            print(res.stdout[-4000:], res.stderr[-8000:], file=sys.stderr)
            sys.exit(f"llama-bench failed ({res.returncode})")
        rows = json.loads(res.stdout)
        all_rows.append({"env": env, "rows": rows})
        table: dict[tuple[str, str], tuple[float, float]] = {}
        for r in rows:
            variant = Path(r["model_filename"]).name.split("-")[1]
            test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
            table[(variant, test)] = (r["avg_ts"], r["stddev_ts"])
        if not suffix:
            backend = rows[0].get("backends", "") if rows else ""
            device = rows[0].get("gpu_info") or rows[0].get("cpu_info", "") if rows else ""
            print(f"\nbackend: {backend}  device: {device}  layers: {a.layers}  experts: {a.experts} top-{a.top_k}"
                  f"  ngl: {a.ngl}")
            print(f"| variant | {' | '.join(t + ' t/s' for t in tests)} | {' | '.join(t + ' ratio' for t in tests)} |")
            print("|---|" + "---|" * (2 * len(tests)))
        for variant in ("uniform", *VARIANT_TYPES):
            if suffix and variant == "uniform":
                continue  # ratios of this run are against its own uniform row
            vals = [table.get((variant, t), (float('nan'), 0.0)) for t in tests]
            ratios = [table.get((variant, t), (float('nan'),))[0] / table.get(("uniform", t), (float('nan'),))[0]
                      for t in tests]
            print(f"| {labels[variant]}{suffix} | " + " | ".join(f"{v:.2f} ± {s:.2f}" for v, s in vals) + " | "
                  + " | ".join(f"{r:.3f}" for r in ratios) + " |", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"backend": backend, "device": device, "runs": all_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
