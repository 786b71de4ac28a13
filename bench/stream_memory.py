"""Peak memory of calibration: the whole-model pass vs the layer-streamed one (issue 15).

Writes a random Qwen3-MoE checkpoint of many layers (bf16 safetensors, several shards), then runs the
statistics pass in a fresh process per mode and prints a table: peak RSS of that process (ru_maxrss,
which includes the imports), wall time, and the loss (equal in both modes: same statistics).
Optionally (`--costs`) the streamed mode also estimates the GEMQ costs two layers at a time; the `+tune`
modes then tune the routers against Q4_K experts (`tune_for_plan`: teacher pass, 1 epoch, held-out
scores), in memory or layer-streamed (router_stream.py): the tuning column and the held-out KD after
tuning (equal in both modes).

    PYTHONPATH=$PWD nice python bench/stream_memory.py --layers 12 --out-dir /tmp/stream-bench
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch


def make_checkpoint(path: Path, args: argparse.Namespace) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=args.vocab, hidden_size=args.hidden,
                               num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                               num_key_value_heads=max(1, args.hidden // 512), head_dim=128,
                               intermediate_size=4 * args.hidden, moe_intermediate_size=args.ffn,
                               num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True,
                               decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
                               max_position_embeddings=4096)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="500MB")


def run_mode(path: Path, mode: str, args: argparse.Namespace) -> dict:
    """One measurement, in this (fresh) process."""
    from gemq_gguf.archs import adapter_for
    from gemq_gguf.gemq.stats import collect_stats, load_for_calibration
    from transformers import AutoConfig
    torch.set_num_threads(args.threads)
    adapter = adapter_for(AutoConfig.from_pretrained(path).architectures)
    tokens = torch.randint(0, args.vocab, (args.tokens // args.seq_len, args.seq_len),
                           generator=torch.Generator().manual_seed(0))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    tune_s = kd = None
    if mode.startswith("full"):
        model = load_for_calibration(path)
        stats = collect_stats(model, adapter, tokens, work_dir=args.out_dir)
        cost_s = None
        if mode == "full+tune":
            from gemq_gguf.gemq.router_ft import ModelRunner
            tune_s, kd = _tune(ModelRunner(model, adapter, stats.imatrix().means()), adapter, model.config, tokens)
    else:
        from gemq_gguf.gemq.streaming import open_layer_source, stream_stats, streamed_costs
        source = open_layer_source(path, adapter)
        stats = stream_stats(source, adapter, tokens, work_dir=args.out_dir)
        cost_s = None
        if mode == "stream+costs":
            t1 = time.perf_counter()
            streamed_costs(source, adapter, stats, stats.imatrix().means(), types=("Q4_K",))
            cost_s = time.perf_counter() - t1
        if mode == "stream+tune":
            from gemq_gguf.gemq.router_stream import StreamedRunner
            runner = StreamedRunner(source, adapter, stats.imatrix().means(), work_dir=args.out_dir)
            tune_s, kd = _tune(runner, adapter, source.model.config, tokens)
    return {"mode": mode, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "after_imports": rss0, "seconds": time.perf_counter() - t0, "cost_seconds": cost_s, "loss": stats.loss,
            "tune_seconds": tune_s, "kd_after": kd}


def _tune(runner: Any, adapter: Any, config: Any, tokens: torch.Tensor) -> tuple[float, float]:
    """Router tuning against Q4_K experts (1 epoch, lr 1e-3): seconds and the held-out KD after."""
    from gemq_gguf.gemq.router_ft import tune_for_plan
    from gemq_gguf.options import TuneOptions
    from gemq_gguf.plan import uniform_plan
    shape = adapter.moe_shape(config)
    t0 = time.perf_counter()
    tuning = tune_for_plan(runner, tokens, uniform_plan(list(shape.moe_layers), shape.n_experts, "Q4_K"),
                           TuneOptions(lr=1e-3, epochs=1, select="last"), progress=False)
    return time.perf_counter() - t0, tuning.report["heldout"]["kd_after"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=["full", "stream"], choices=["full", "stream", "stream+costs", "full+tune", "stream+tune"])
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/gemq-stream-bench"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    path = args.out_dir / f"qwen3moe-L{args.layers}-H{args.hidden}-E{args.experts}x{args.ffn}"
    if args.child == "make":  # its own process, so no measurement inherits its memory
        make_checkpoint(path, args)
    elif args.child:
        print(json.dumps(run_mode(path, args.child, args)))
    else:
        report(path, args)


def report(path: Path, args: argparse.Namespace) -> None:
    if not (path / "config.json").is_file():
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", "make"], check=True)
    from gemq_gguf.gemq.streaming import model_bytes
    size = model_bytes(path, torch.float32)
    print(f"checkpoint {path.name}: {size / 2**30:.2f} GiB at float32 ({size / 2**31:.2f} GiB bf16 on disk); "
          f"{args.tokens} tokens, seq {args.seq_len}, {args.threads} thread(s)\n")
    print(f"{'mode':<14} {'peak RSS GiB':>12} {'after imports':>13} {'wall s':>8} {'costs s':>8} {'loss':>10} "
          f"{'tuning s':>9} {'KD after':>12}")
    for mode in args.modes:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", mode], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        cost = f"{r['cost_seconds']:8.1f}" if r["cost_seconds"] is not None else f"{'-':>8}"
        tune = f"{r['tune_seconds']:9.1f} {r['kd_after']:12.8f}" if r["tune_seconds"] is not None else f"{'-':>9} {'-':>12}"
        print(f"{r['mode']:<14} {r['peak_rss'] / 2**30:12.2f} {r['after_imports'] / 2**30:13.2f} "
              f"{r['seconds']:8.1f} {cost} {r['loss']:10.6f} {tune}")


if __name__ == "__main__":
    main()
