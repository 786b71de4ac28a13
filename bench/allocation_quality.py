#!/usr/bin/env python3
"""Allocation quality on the demo model: mean KLD to the F32 model for gemq (expert), gemq (tensor,
stock-loadable), layerwise and uniform allocations at the same expert budgets, side by side.

Calibration and cost estimation run once; every strategy then solves the same cost table and writes a
GGUF with the same imatrix and non-expert policy, so the rows differ only in the allocation.

    python bench/allocation_quality.py                       # demo model, budgets 2.5 3.0 3.5
    python bench/allocation_quality.py --eval-chunks 8 --budgets 3.0
Prints a table and writes bench/out/allocation_quality.json. Mixed files need the patched runtime.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import Bench, save_rows
from rich.console import Console
from rich.table import Table

from gemq_gguf.allocate import solve
from gemq_gguf.options import FISHER_LABELS
from gemq_gguf.plan import PlanOrigin

ROWS = {"gemq-expert": ("gemq (expert)", "gemq", "expert"), "gemq-tensor": ("gemq (tensor)", "gemq", "tensor"),
        "layerwise": ("layerwise", "layerwise", "expert"), "uniform": ("uniform", "uniform", "expert")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5])
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--eval-chunks", type=int, default=16, help="max 512-token chunks per eval domain")
    ap.add_argument("--out-dir", type=Path, default=Path("bench/out"))
    ap.add_argument("--fisher", choices=FISHER_LABELS, default=FISHER_LABELS[0])
    ap.add_argument("--strategies", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--name", default="allocation_quality")
    args = ap.parse_args()
    bench = Bench.open(args.model, args.out_dir, args.eval_chunks)
    bench.prepare_costs(args.calib_tokens, args.fisher)

    rows = []
    for budget in args.budgets:
        for label, strategy, gran in (ROWS[k] for k in args.strategies):
            alloc = solve(strategy, bench.problems[gran], budget, max_types=3)
            path = bench.write(f"alloc-{strategy}-{gran}-{budget}", bench.plan_of(alloc),
                               PlanOrigin(strategy, gran, budget))
            rows.append({"budget": budget, "allocation": label, "predicted_loss": alloc.total_cost,
                         **bench.evaluate(path)})
            path.unlink()
            print(json.dumps(rows[-1]), flush=True)

    table = Table(title=f"allocation quality, {bench.src.model_dir.name}: KLD vs F32, packaged eval text, ctx 512")
    for col in ("budget", "allocation", "expert bpw", "file bpw", "predicted loss", "mean KLD", "p99 KLD",
                "same top", "PPL", "KLD / best"):
        table.add_column(col, justify="left" if col == "allocation" else "right")
    for budget in args.budgets:
        group = [r for r in rows if r["budget"] == budget]
        best = min(r["kld_mean"] for r in group)
        for r in group:
            table.add_row(f"{budget}", r["allocation"], f"{r['expert_bpw']:.3f}", f"{r['file_bpw']:.3f}",
                          f"{r['predicted_loss']:.3g}", f"{r['kld_mean']:.4f}", f"{r['kld_p99']:.3f}",
                          f"{100 * r['same_top_p']:.2f}%", f"{r['ppl']:.2f}", f"{r['kld_mean'] / best:.2f}x")
    Console(width=160).print(table)
    print(f"calibration + costs: {bench.prep_seconds:.0f} s; reference (F32) PPL {rows[0]['ppl_base']:.2f}")
    save_rows(args.out_dir, args.name, rows, {"prep_seconds": bench.prep_seconds, "args": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
