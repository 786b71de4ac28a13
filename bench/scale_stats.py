"""The statistics stage at Qwen3-30B-A3B's layer shapes and many layers: layer-streamed calibration and the
GEMQ cost pass, on the CPU or on a GPU capped below the model's size (issue 15).

bench/scale.py measures the whole conversion against llama.cpp's tools, which on this project's 2-core
machine reaches a few layers. The stages that hold model weights are calibration and costs (the writer
holds one expert at a time), so this benchmark runs just those, for several layer counts, each in its
own process with the whole process tree's RSS sampled (bench/scale.py `measure`), and reports per layer
count: wall time and time per layer for calibration and costs, peak RSS and its anonymous part, and on a
GPU the peak memory PyTorch allocated there. `--gpu-memory GIB` caps what PyTorch may allocate on the GPU
(`torch.cuda.set_per_process_memory_fraction`), to show a model larger than the GPU going through it.

    PYTHONPATH=$PWD python bench/scale_stats.py --layers 4 12 --calib-tokens 4096 [--gpu-memory 8] --out-dir /tmp/gemq-scale

Checkpoints are bench/scale.py's (random bf16, one shard per layer, vocab 16384 by default). Prints a table
and writes `scale-stats.json` in the out dir.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from scale import child_env, make_checkpoint, measure

TYPES = ("IQ2_XXS", "Q2_K", "IQ3_XXS", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K")  # the CLI's default candidates


def child(ckpt: Path, cache: Path, work: Path, tokens: int, cost_rows: str, gpu_gib: float, out: Path) -> None:
    """One layer count, in this process: streamed calibration, then the cost pass; timings to `out`."""
    import torch

    from gemq_gguf.gemq.budget import calibrate, cost_rows as resolve_rows, cost_table
    from gemq_gguf.gemq.cache import StatsCache
    from gemq_gguf.options import CalibOptions
    from gemq_gguf.pipeline import open_source
    cuda = torch.cuda.is_available()
    if cuda and gpu_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_gib * 2**30 / total))
    src = open_source(str(ckpt))
    store = StatsCache(cache)
    anon = _AnonPeak()
    t0 = time.perf_counter()
    c = calibrate(src.model_dir, src.adapter, CalibOptions(tokens=tokens, memory="stream"), work, store)
    t1 = time.perf_counter()
    calib_anon = anon.reset()
    rows = resolve_rows(None if cost_rows == "auto" else float(cost_rows), src.shape)
    cost_table(c, src.adapter, src.shape, list(TYPES), "expert", store, rows)
    t2 = time.perf_counter()
    out.write_text(json.dumps({"calib_s": t1 - t0, "costs_s": t2 - t1, "calib_anon": calib_anon, "costs_anon": anon.reset(),
                               "cost_rows": rows, "device": "cuda" if cuda else "cpu",
                               "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
                               "gpu_cap_gib": gpu_gib if cuda else None,
                               "gpu_peak": torch.cuda.max_memory_allocated() if cuda else None,
                               "threads": torch.get_num_threads()}))


class _AnonPeak:
    """Peak anonymous RSS of this process (RssAnon, sampled every 0.1 s) since the last `reset`."""

    def __init__(self) -> None:
        import threading
        self.peak = 0
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.now())
            time.sleep(0.1)

    def reset(self) -> int:
        peak, self.peak = max(self.peak, self.now()), 0
        return peak


def run(args: argparse.Namespace) -> dict:
    out = args.out_dir.resolve()
    rows = []
    for n in args.layers:
        ckpt = out / f"qwen3-30b-shapes-L{n}-V{args.vocab}"
        if not (ckpt / "config.json").is_file():
            t0 = time.perf_counter()
            make_checkpoint(ckpt, n, args.vocab)
            print(f"{n} layers: checkpoint written in {time.perf_counter() - t0:.1f} s", flush=True)
        run_dir = out / f"stats-L{n}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cache, work = run_dir / "cache", run_dir / "work"
        cache.mkdir(parents=True)
        work.mkdir()
        res = run_dir / "child.json"
        cmd = [sys.executable, __file__, "--child", str(ckpt), "--cache", str(cache), "--work", str(work), "--res",
               str(res), "--calib-tokens", str(args.calib_tokens), "--cost-rows", args.cost_rows,
               "--gpu-memory", str(args.gpu_memory)]
        m = measure(cmd, run_dir / "child.log", [cache, work], child_env())
        row = {"layers": n, **m, **json.loads(res.read_text()),
               "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))}
        rows.append(row)
        print(table([row], header=False), flush=True)
        shutil.rmtree(run_dir / "cache", ignore_errors=True)  # the next layer count needs the disk
    return {"calib_tokens": args.calib_tokens, "vocab": args.vocab, "rows": rows}


def table(rows: list[dict], header: bool = True) -> str:
    gib = 2**30
    lines = []
    if header:
        r = rows[0]
        lines += [f"streamed calibration + GEMQ costs at Qwen3-30B-A3B shapes on {r['device']}"
                  + (f" ({r['gpu_name']}, capped at {r['gpu_cap_gib']:g} GiB)" if r["gpu_name"] and r["gpu_cap_gib"]
                     else f" ({r['gpu_name']})" if r["gpu_name"] else f" ({r['threads']} threads)")
                  + f"; cost rows {r['cost_rows']:g}", "",
                  "| layers | model GiB | calib s | per layer | costs s | per layer | peak RSS GiB | anonymous GiB "
                  "| of it calibration | costs | GPU peak GiB | peak disk GiB |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        n = r["layers"]
        gpu = f"{r['gpu_peak'] / gib:.2f}" if r["gpu_peak"] is not None else "-"
        lines.append(f"| {n} | {r['checkpoint_bytes'] / gib:.2f} | {r['calib_s']:.1f} | {r['calib_s'] / n:.1f} | "
                     f"{r['costs_s']:.1f} | {r['costs_s'] / n:.1f} | {r['peak_rss'] / gib:.2f} | "
                     f"{r['peak_anon'] / gib:.2f} | {r['calib_anon'] / gib:.2f} | {r['costs_anon'] / gib:.2f} | {gpu} | {r['peak_disk'] / gib:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--cost-rows", default="auto")
    p.add_argument("--gpu-memory", type=float, default=0.0, help="GiB PyTorch may allocate on the GPU (0: no cap)")
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/gemq-scale"))
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--res", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.cache, args.work, args.calib_tokens, args.cost_rows, args.gpu_memory, args.res)
        return
    res = run(args)
    (args.out_dir / "scale-stats.json").write_text(json.dumps(res, indent=1))
    print(table(res["rows"]))


if __name__ == "__main__":
    main()
