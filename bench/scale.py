"""Conversion at Qwen3-30B-A3B's real layer shapes: memory, disk and time, against llama.cpp's own tools (issue 15).

Writes a random Qwen3-MoE checkpoint with Qwen3-30B-A3B's layer shapes (hidden 2048, 128 experts x 768,
top-8, GQA 32/4 heads of 128) and N decoder layers, bf16, one safetensors shard per layer (never the whole
model in memory); the vocabulary is smaller than the real 151,936 (`--vocab`, a byte-level BPE trained on
the packaged calibration text), which shrinks only the embeddings and the LM head. Then, each in its own
process, with the whole process tree's RSS (summed over /proc every 0.2 s) and the bytes under the work,
output and cache folders sampled:

1. `convert.py CKPT --budget 3.0 --calib-memory stream --cost-rows R -o OUT` on a cold statistics cache
   (`--cost-rows`, default auto: 1/8 at these shapes; the report's fraction is in the table's header);
2. llama.cpp's side on the same model and the same calibration tokens: `convert_hf_to_gguf` (bf16, our
   stage 1 is the same code), `llama-imatrix` (seq 512, the same number of chunks) and
   `llama-quantize --imatrix Q3_K_M`;
3. a second `convert.py --budget 2.5` on the now cached model, against `llama-quantize` alone.

    PYTHONPATH=$PWD nice python bench/scale.py --layers 1 --calib-tokens 4096 [--cost-rows auto] --out-dir /tmp/gemq-scale

Prints a table and writes `scale-L{N}.json` in the out dir. `--steps` runs a part (`cold`: 1; `llama`: 2;
`cached`: 3, after `cold`) and merges its rows into that file, so a run can be split across sessions with
a time limit (a lent GPU machine); the table is printed once every row is there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, EXPERTS, FFN, TOP_K, HEADS, KV_HEADS, HEAD_DIM = 2048, 128, 768, 8, 32, 4, 128
REAL_VOCAB = 151936


# ---- the checkpoint -------------------------------------------------------------------------------------

def _tokenizer(vocab: int):  # noqa: ANN202 - transformers type
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from gemq_gguf.data import calib_texts
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(calib_texts().values()), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def make_checkpoint(path: Path, layers: int, vocab: int, seed: int = 0) -> None:
    """Qwen3-MoE at Qwen3-30B-A3B's layer shapes, random bf16 weights, one shard per layer, the experts
    stored one tensor per expert as the real checkpoint stores them."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=layers,
                               num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                               intermediate_size=6144, moe_intermediate_size=FFN, num_experts=EXPERTS,
                               num_experts_per_tok=TOP_K, norm_topk_prob=True, decoder_sparse_step=1,
                               mlp_only_layers=[], tie_word_embeddings=False, max_position_embeddings=40960,
                               rope_theta=1e6, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0, dtype="bfloat16",
                               architectures=["Qwen3MoeForCausalLM"])
    cfg.save_pretrained(tmp)
    _tokenizer(vocab).save_pretrained(tmp)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    n = layers + 2
    shard(f"model-00001-of-{n:05d}.safetensors", {"model.embed_tokens.weight": rand(vocab, HIDDEN)})
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "self_attn.q_proj.weight": rand(HEADS * HEAD_DIM, HIDDEN),
             p + "self_attn.k_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
             p + "self_attn.v_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
             p + "self_attn.o_proj.weight": rand(HIDDEN, HEADS * HEAD_DIM),
             p + "self_attn.q_norm.weight": torch.ones(HEAD_DIM, dtype=torch.bfloat16),
             p + "self_attn.k_norm.weight": torch.ones(HEAD_DIM, dtype=torch.bfloat16),
             p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
             p + "mlp.gate.weight": rand(EXPERTS, HIDDEN, std=0.5)}  # routers with real spread: no near-ties
        for e in range(EXPERTS):
            q = f"{p}mlp.experts.{e}."
            t.update({q + "gate_proj.weight": rand(FFN, HIDDEN), q + "up_proj.weight": rand(FFN, HIDDEN),
                      q + "down_proj.weight": rand(HIDDEN, FFN)})
        shard(f"model-{i + 2:05d}-of-{n:05d}.safetensors", t)
        del t
    shard(f"model-{n:05d}-of-{n:05d}.safetensors", {"model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                                                   "lm_head.weight": rand(vocab, HIDDEN)})
    size = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size},
                                                                  "weight_map": weight_map}, indent=1))
    os.replace(tmp, path)


# ---- measuring a command --------------------------------------------------------------------------------

def _tree_rss(root: int) -> tuple[int, int]:
    """RSS bytes of `root` and all its descendants (from /proc), and the anonymous part of it (RSS less
    file-backed pages: what memory-mapped model files add is reclaimable page cache, not memory held)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, tuple[int, int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/statm") as f:
                resident, shared = (int(x) * os.sysconf("SC_PAGE_SIZE") for x in f.read().split()[1:3])
                rss[int(d)] = (resident, resident - shared)
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    total, anon, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        r, a = rss.get(pid, (0, 0))
        total, anon = total + r, anon + a
        todo.extend(children.get(pid, []))
    return total, anon


def _disk_bytes(folders: list[Path]) -> int:
    """Bytes allocated on disk under `folders` (st_blocks: spill files reserved with fallocate count)."""
    total = 0
    for folder in folders:
        for dirpath, _, files in os.walk(folder):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
                except OSError:
                    pass
    return total


def measure(cmd: list[str], log: Path, disk: list[Path], env: dict[str, str] | None = None) -> dict:
    """Run `cmd`; wall time, CPU time, peak RSS of its process tree, peak bytes under `disk` beyond
    what was there at the start."""
    base = _disk_bytes(disk)
    peak = {"rss": 0, "anon": 0, "disk": 0}
    with log.open("w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        done = threading.Event()

        def sample() -> None:
            n = 0
            while not done.is_set():
                rss, anon = _tree_rss(proc.pid)
                peak["rss"], peak["anon"] = max(peak["rss"], rss), max(peak["anon"], anon)
                if n % 5 == 0:
                    peak["disk"] = max(peak["disk"], _disk_bytes(disk) - base)
                n += 1
                done.wait(0.2)

        def copy() -> None:  # the output, each line stamped with the seconds since the start
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, b""):
                fh.write(f"[{time.perf_counter() - t0:9.2f}] {line.decode(errors='replace').rstrip()}\n")
                fh.flush()
        threads = [threading.Thread(target=f, daemon=True) for f in (sample, copy)]
        for th in threads:
            th.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        for th in threads:
            th.join()
        fh.write(f"[{wall:9.2f}] (exit)\n")
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"{cmd[0]} ... failed ({rc}); see {log}:\n" + log.read_text()[-3000:])
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss": peak["rss"],
            "peak_anon": peak["anon"], "peak_disk": peak["disk"], "max_child_rss": usage.ru_maxrss * 1024}


# ---- the benchmark --------------------------------------------------------------------------------------

def _calibration_text(tokens: int, path: Path) -> None:
    """The packaged calibration mix, enough of it for `tokens` tokens and more (llama-imatrix cuts chunks)."""
    from gemq_gguf.data import calib_texts
    texts = list(calib_texts().values())
    out, i = [], 0
    while sum(len(t) for t in out) < 8 * tokens:  # >= ~2 characters a token for this BPE
        out.append(texts[i % len(texts)])
        i += 1
    path.write_text("\n\n".join(out))


STEPS = ("cold", "llama", "cached")


def child_env() -> dict[str, str]:
    """A child process imports this checkout first, then whatever PYTHONPATH already held (e.g. carried wheels)."""
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            "PYTHONUNBUFFERED": "1"}


def run(args: argparse.Namespace, res: dict) -> dict:
    """Run the asked `args.steps`, adding their rows to `res` (the rows of earlier steps)."""
    from gemq_gguf.runtime import bin_path
    out = args.out_dir.resolve()
    ckpt = out / f"qwen3-30b-shapes-L{args.layers}-V{args.vocab}"
    if not (ckpt / "config.json").is_file():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--make", str(ckpt), "--layers", str(args.layers),
                        "--vocab", str(args.vocab)], check=True)
        print(f"checkpoint written in {time.perf_counter() - t0:.1f} s")
    run_dir = out / f"run-L{args.layers}"
    if "cold" in args.steps:
        shutil.rmtree(run_dir, ignore_errors=True)
    elif "cached" in args.steps and not (run_dir / "cache").is_dir():
        sys.exit(f"--steps cached needs the cold run's cache in {run_dir}: run --steps cold first")
    work, cache, files = run_dir / "work", run_dir / "cache", run_dir / "files"
    for d in (work, cache, files):
        d.mkdir(parents=True, exist_ok=True)
    threads = str(args.threads or os.cpu_count())
    env = child_env()
    ours = [sys.executable, str(ROOT / "convert.py"), str(ckpt), "--calib-memory", "stream", "--calib-tokens",
            str(args.calib_tokens), "--seq-len", "512", "--cache-dir", str(cache), "--work-dir", str(work),
            "--cost-rows", args.cost_rows, *(["--no-verify"] if args.no_verify else [])]
    disk = [work, cache, files]
    res.update({"layers": args.layers, "vocab": args.vocab, "calib_tokens": args.calib_tokens, "threads": threads,
                "cost_rows_asked": args.cost_rows,
                "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.glob("*.safetensors")),
                "layer_bytes_bf16": (ckpt / f"model-00002-of-{args.layers + 2:05d}.safetensors").stat().st_size})
    if "cold" in args.steps:
        _cold(res, ours, run_dir, files, disk, env)
    if "llama" in args.steps:
        _llama(res, args, ckpt, run_dir, files, disk, env, threads, bin_path)
    if "cached" in args.steps:
        _cached(res, ours, run_dir, files, disk, env)
    return res


def _cold(res: dict, ours: list[str], run_dir: Path, files: Path, disk: list[Path], env: dict[str, str]) -> None:
    print("1/5 convert.py --budget 3.0 (cold cache)")
    res["ours_cold"] = measure([*ours, "--budget", "3.0", "-o", str(files / "gemq-3.0.gguf"), "--keep-intermediate"],
                               run_dir / "ours_cold.log", disk, env)
    report = json.loads((files / "gemq-3.0.json").read_text())
    res["ours_cold"]["cost_seconds"] = report["allocation"].get("cost_seconds")
    res["cost_rows"] = report["allocation"].get("cost_rows")  # the fraction used (auto resolved)
    res["ours_cold"]["verification_kld"] = (report.get("verification") or {}).get("kld_mean")
    res["ours_cold"]["file_bytes"] = (files / "gemq-3.0.gguf").stat().st_size
    bf16 = files / "gemq-3.0.bf16.gguf"
    res["intermediate_type"] = "bf16" if bf16.exists() else "other"
    res["steps"] = _step_times(run_dir / "ours_cold.log")


def _llama(res: dict, args: argparse.Namespace, ckpt: Path, run_dir: Path, files: Path, disk: list[Path],
           env: dict[str, str], threads: str, bin_path: Callable[[str], Path]) -> None:
    print("2/5 convert_hf_to_gguf (bf16)")
    ref = files / "ref.bf16.gguf"
    res["llama_convert"] = measure([sys.executable, "-c", "import sys; from pathlib import Path; "
                                    "from gemq_gguf.convert.hf_to_gguf import hf_to_float_gguf; "
                                    "hf_to_float_gguf(Path(sys.argv[1]), Path(sys.argv[2]), 'bf16')", str(ckpt), str(ref)],
                                   run_dir / "convert.log", disk, env)
    text = run_dir / "calib.txt"
    _calibration_text(args.calib_tokens, text)
    chunks = math.ceil(args.calib_tokens / 512)
    print("3/5 llama-imatrix")
    imat = files / "imatrix.gguf"
    res["llama_imatrix"] = measure([str(bin_path("llama-imatrix")), "-m", str(ref), "-f", str(text), "-o", str(imat),
                                    "-c", "512", "-b", "512", "--chunks", str(chunks), "-t", threads],
                                   run_dir / "imatrix.log", disk)
    res["llama_imatrix"]["chunks"] = chunks
    print("4/5 llama-quantize Q3_K_M")
    res["llama_quantize"] = measure([str(bin_path("llama-quantize")), "--imatrix", str(imat), str(ref),
                                     str(files / "q3_k_m.gguf"), "Q3_K_M", threads], run_dir / "quantize.log", disk)
    res["llama_quantize"]["file_bytes"] = (files / "q3_k_m.gguf").stat().st_size


def _cached(res: dict, ours: list[str], run_dir: Path, files: Path, disk: list[Path], env: dict[str, str]) -> None:
    print("5/5 convert.py --budget 2.5 (cached statistics and costs)")
    res["ours_cached"] = measure([*ours, "--budget", "2.5", "-o", str(files / "gemq-2.5.gguf")],
                                 run_dir / "ours_cached.log", disk, env)
    res["steps_cached"] = _step_times(run_dir / "ours_cached.log")
    cached = json.loads((files / "gemq-2.5.json").read_text())
    res["ours_cached"]["expert_matrices"] = cached["file"].get("expert_matrices")  # the writer's reuse


_STEP = re.compile(r"^\[\s*([\d.]+)\] .*?(step \d/\d: [^(]*?)\s*(?:\(|$)")


def _step_times(log: Path) -> dict[str, float]:
    """Seconds from each 'step k/n' line of the pipeline's log to the next one (or to the exit)."""
    marks = []
    for line in log.read_text().splitlines():
        m = _STEP.match(line)
        if m:
            marks.append((float(m.group(1)), m.group(2).strip()))
    end = float(re.findall(r"^\[\s*([\d.]+)\] \(exit\)", log.read_text(), re.M)[-1])
    start = [(0.0, "start-up (imports, checks)")] + marks
    return {name: round(nxt - t, 2) for (t, name), (nxt, _) in zip(start, start[1:] + [(end, "")])}


def table(r: dict) -> str:
    gib = 2**30
    c, q, i, v, h = r["ours_cold"], r["llama_quantize"], r["llama_imatrix"], r["llama_convert"], r["ours_cached"]
    rows = [("convert.py --budget 3.0, cold", c), ("convert.py --budget 2.5, cached", h),
            ("convert_hf_to_gguf bf16", v), ("llama-imatrix", i), ("llama-quantize Q3_K_M", q)]
    lines = [f"{r['layers']} layer(s) at Qwen3-30B-A3B shapes, vocab {r['vocab']} (real {REAL_VOCAB}); checkpoint "
             f"{r['checkpoint_bytes'] / gib:.2f} GiB bf16, one layer {r['layer_bytes_bf16'] / gib:.2f} GiB; "
             f"{r['calib_tokens']} calibration tokens; {r['threads']} threads; intermediate {r['intermediate_type']}; "
             f"--cost-rows {r.get('cost_rows_asked', '1')} (used: {r.get('cost_rows', 1)})",
             "", f"| {'run':<34} | wall s | CPU s | peak RSS (tree) GiB | of it anonymous GiB | peak extra disk GiB |",
             f"|{'-' * 36}|-------:|------:|------:|------:|------:|"]
    for name, m in rows:
        lines.append(f"| {name:<34} | {m['wall_s']:6.1f} | {m['cpu_s']:6.1f} | {m['peak_rss'] / gib:6.2f} | "
                     f"{m.get('peak_anon', float('nan')) / gib:6.2f} | {m['peak_disk'] / gib:6.2f} |")
    llama = i["wall_s"] + q["wall_s"]
    for key, what in (("steps", "cold"), ("steps_cached", "cached")):
        lines.append(f"{what} run, seconds per step: " + "; ".join(f"{k} {v:.1f}" for k, v in r[key].items()))
    lines += ["", f"cold: {c['wall_s'] / r['layers']:.1f} s per layer; cost pass {c.get('cost_seconds')} s",
              f"cold / (llama-imatrix + llama-quantize): {c['wall_s'] / llama:.1f}x wall "
              f"(with convert_hf_to_gguf on their side: {c['wall_s'] / (llama + v['wall_s']):.1f}x)",
              f"cached / llama-quantize: {h['wall_s'] / q['wall_s']:.1f}x wall "
              f"(with convert_hf_to_gguf: {h['wall_s'] / (q['wall_s'] + v['wall_s']):.1f}x)"]
    if h.get("expert_matrices"):
        lines.append("cached run's writer: {from_cache} expert matrices from the cache, {quantized} quantized"
                     .format(**h["expert_matrices"]))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0, help="llama.cpp tools' threads (default: all cores)")
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/gemq-scale"))
    p.add_argument("--cost-rows", default="auto", help="convert.py's --cost-rows for both of its runs (default auto, "
                                                       "the CLI's default; 1 = exact costs)")
    p.add_argument("--no-verify", action="store_true", help="convert.py --no-verify (where llama-cpp-python, which "
                                                               "runs the verification, is not installed)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {','.join(STEPS)} (default all)")
    p.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make:
        make_checkpoint(args.make, args.layers, args.vocab)
        return
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if not args.steps or set(args.steps) - set(STEPS):
        sys.exit(f"--steps takes a comma-separated list of {', '.join(STEPS)}")
    saved = args.out_dir / f"scale-L{args.layers}.json"
    earlier = json.loads(saved.read_text()) if saved.exists() and set(args.steps) != set(STEPS) else {}
    res = run(args, earlier)
    saved.write_text(json.dumps(res, indent=1))
    if all(k in res for k in ("ours_cold", "ours_cached", "llama_convert", "llama_imatrix", "llama_quantize")):
        print(table(res))
    else:
        print(f"rows so far in {saved}: " + ", ".join(k for k in res if k.startswith(("ours_", "llama_"))))


if __name__ == "__main__":
    main()
