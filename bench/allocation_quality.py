#!/usr/bin/env python3
"""Allocation quality on the demo model: mean KLD to the F32 model for gemq (expert), gemq (tensor,
stock-loadable), layerwise and uniform allocations at the same expert budgets, side by side.

Calibration and cost estimation run once; every strategy then solves the same cost table and writes a
GGUF with the same imatrix and non-expert policy, so the rows differ only in the allocation.

    python bench/allocation_quality.py                       # demo model, budgets 2.5 3.0 3.5
    python bench/allocation_quality.py --eval-chunks 8 --budgets 3.0
Prints a table and writes JSON + a markdown table (default bench/out/allocation_quality.*).
Needs the patched llama-cpp-python for the mixed (gemq expert, layerwise) files.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gemq_gguf.allocate import DEFAULT_TYPES, solve, to_tensor_granularity
from gemq_gguf.checkpoint import inspect_checkpoint
from gemq_gguf.costs import estimate_costs
from gemq_gguf.data import eval_texts
from gemq_gguf.evaluate import evaluate_gguf
from gemq_gguf.gemq import calibrate
from gemq_gguf.hf_to_gguf import hf_to_float_gguf
from gemq_gguf.pipeline import ConvertOptions, Source, resolve_model
from gemq_gguf.plan import plan_from_units
from gemq_gguf.policy import TensorPolicy
from gemq_gguf.writer import write_gguf

ROWS = (("gemq (expert)", "gemq", "expert"), ("gemq (tensor)", "gemq", "tensor"),
        ("layerwise", "layerwise", "expert"), ("uniform", "uniform", "expert"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5])
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--eval-chunks", type=int, default=None, help="max 512-token chunks per eval domain")
    ap.add_argument("--out-dir", type=Path, default=Path("bench/out"))
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(args.model)
    config, adapter, shape = inspect_checkpoint(model_dir)
    ref = args.out_dir / f"{model_dir.name}.f32.gguf"
    if not ref.exists():
        hf_to_float_gguf(model_dir, ref, "f32")
    src = Source(model_dir, config, adapter, shape, ref)
    opts = ConvertOptions(model=str(model_dir), out=args.out_dir / "x.gguf", calib_tokens=args.calib_tokens)

    t0 = time.perf_counter()
    model, stats, imatrix = calibrate(opts, src)
    cache: dict = {}
    tables = {g: estimate_costs(model, adapter, stats, imatrix, types=DEFAULT_TYPES, granularity=g, cache=cache,
                                progress=True) for g in ("expert", "expert-proj")}
    prep_s = time.perf_counter() - t0
    del model, stats
    problems = {"expert": tables["expert"].problem(), "tensor": to_tensor_granularity(tables["expert-proj"].problem())[0]}

    texts = eval_texts()
    rows = []
    for budget in args.budgets:
        for label, strategy, gran in ROWS:
            alloc = solve(strategy, problems[gran], budget, max_types=3)
            plan = plan_from_units(alloc.to_dict()["units"], list(shape.moe_layers), shape.n_experts)
            out = args.out_dir / f"{model_dir.name}-{strategy}-{gran}-{budget}.gguf"
            summary = write_gguf(ref, out, plan, TensorPolicy(), imatrix=imatrix, quant_cache=dict(cache),
                                 metadata={"strategy": strategy, "granularity": gran, "budget": budget}, progress=False)
            res = evaluate_gguf(out, ref, texts, ctx=512, max_chunks=args.eval_chunks,
                                ref_cache_dir=args.out_dir / "refcache")
            rows.append({"budget": budget, "allocation": label, "expert_bpw": summary.expert_bpw,
                         "file_bpw": summary.file_bpw, "file_mib": summary.file_bytes / 2**20,
                         "predicted_loss": alloc.total_cost, "kld_mean": res.total.kld_mean,
                         "kld_p99": res.total.kld_p99, "same_top_p": res.total.same_top_p, "ppl": res.total.ppl,
                         "ppl_base": res.total.ppl_base,
                         "kld_by_domain": {d: s.kld_mean for d, s in res.domains.items()}})
            print(json.dumps(rows[-1]), flush=True)
            out.unlink()

    table = Table(title=f"allocation quality, {model_dir.name} (KLD vs F32 on packaged eval text, ctx 512)")
    for col in ("budget", "allocation", "expert bpw", "file bpw", "predicted loss", "mean KLD", "p99 KLD",
                "same top", "PPL", "KLD vs best"):
        table.add_column(col, justify="left" if col == "allocation" else "right")
    md = ["| budget | allocation | expert bpw | file bpw | mean KLD | p99 KLD | same top | PPL |", "|---|---|---|---|---|---|---|---|"]
    for budget in args.budgets:
        group = [r for r in rows if r["budget"] == budget]
        best = min(r["kld_mean"] for r in group)
        for r in group:
            table.add_row(f"{budget}", r["allocation"], f"{r['expert_bpw']:.3f}", f"{r['file_bpw']:.3f}",
                          f"{r['predicted_loss']:.3g}", f"{r['kld_mean']:.4f}", f"{r['kld_p99']:.3f}",
                          f"{100 * r['same_top_p']:.2f}%", f"{r['ppl']:.2f}", f"{r['kld_mean'] / best:.2f}x")
            md.append(f"| {budget} | {r['allocation']} | {r['expert_bpw']:.3f} | {r['file_bpw']:.3f} | "
                      f"{r['kld_mean']:.4f} | {r['kld_p99']:.3f} | {100 * r['same_top_p']:.2f}% | {r['ppl']:.2f} |")
    Console().print(table)
    print(f"calibration + costs: {prep_s:.0f} s; reference PPL {rows[0]['ppl_base']:.2f}")
    (args.out_dir / "allocation_quality.json").write_text(json.dumps({"rows": rows, "prep_seconds": prep_s}, indent=1))
    (args.out_dir / "allocation_quality.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
