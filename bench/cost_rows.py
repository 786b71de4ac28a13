"""`--cost-rows`: CPU time of the GEMQ cost pass and the allocation's quality at sampled fractions of rows.

Calibrates once (cached in CACHE_DIR), then per fraction runs the CLI's own `cost_table` (CPU seconds of
this process, all threads: `getrusage`), solves each budget, and reports the share of units whose type
differs from the exact costs' allocation (fraction 1) and the written file's KLD against the F32 GGUF.
For the CPU column run it with OMP_NUM_THREADS=1 (and --no-eval): on a loaded machine torch's OpenMP threads
spin between the cost arithmetic's small ops, and that spinning, not the sampling, then dominates CPU time.

    python bench/cost_rows.py MODEL [--calib-tokens 8192] [--seed 0] [--fractions 1,0.25,0.125] [--budgets 2.5,3.5]
        [--out-dir /tmp/cost-rows] [--cache-dir DIR] [--eval-chunks 4] [--no-eval | --eval-fractions 0.125]
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from _common import Bench, save_rows
from gemq_gguf.allocate import solve
from gemq_gguf.gemq.budget import calibrate, cost_table
from gemq_gguf.gemq.cache import StatsCache
from gemq_gguf.options import DEFAULT_TYPES, CalibOptions
from gemq_gguf.plan import PlanOrigin


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=CalibOptions.seed, help="calibration seed (which text is sampled)")
    ap.add_argument("--fractions", default="1,0.25,0.125")
    ap.add_argument("--budgets", default="2.5,3.5")
    ap.add_argument("--granularity", default="expert")
    ap.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()) / "cost-rows")
    ap.add_argument("--cache-dir", type=Path, help="statistics cache (default OUT_DIR/cache)")
    ap.add_argument("--eval-chunks", type=int, default=4)
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--eval-fractions", help="evaluate only these fractions' files (default: all; e.g. skip 1 when an "
                                             "earlier run of the same statistics measured it: its bytes are the same)")
    a = ap.parse_args()
    fractions = [float(f) for f in a.fractions.split(",")]
    budgets = [float(b) for b in a.budgets.split(",")]
    evaluated = fractions if a.eval_fractions is None else [float(f) for f in a.eval_fractions.split(",")]
    bench = Bench.open(a.model, a.out_dir, a.eval_chunks)
    src, types = bench.src, list(DEFAULT_TYPES)
    store = StatsCache(a.cache_dir or a.out_dir / "cache")
    c = calibrate(src.model_dir, src.adapter, CalibOptions(tokens=a.calib_tokens, seed=a.seed), a.out_dir, store)
    bench.imatrix = c.imatrix
    rows, exact = [], {}
    for f in fractions:
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        table, _ = cost_table(c, src.adapter, src.shape, types, a.granularity, store, f)
        cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - t0
        problem = table.problem()
        for b in budgets:
            alloc = solve("gemq", problem, b, max_types=3)
            choice = np.asarray(alloc.type_index)
            exact.setdefault(b, (choice, problem.cost))
            ref_choice, ref_cost = exact[b]
            units = np.arange(len(choice))
            row = {"fraction": f, "budget": b, "cost_cpu_s": cpu, "cost_wall_s": wall, "bpw": alloc.bpw,
                   "units_changed": float(np.mean(choice != ref_choice)),
                   # the exact costs' predicted loss of this allocation over that of the exact allocation
                   "exact_cost_ratio": float(ref_cost[units, choice].sum() / ref_cost[units, ref_choice].sum())}
            if not a.no_eval and f in evaluated:
                name = f"rows{f:g}-b{b:g}"
                out = bench.write(name, bench.plan_of(alloc), PlanOrigin("gemq", a.granularity, b, tuple(types)))
                row.update({k: v for k, v in bench.evaluate(out).items() if k in ("kld_mean", "kld_p99", "same_top_p")})
                out.unlink()
            rows.append(row)
            print(row, flush=True)
    save_rows(a.out_dir, "cost_rows", rows, {"model": a.model, "calib_tokens": a.calib_tokens, "seed": a.seed})
    t = Table(title=f"--cost-rows on {Path(a.model).name}, {a.calib_tokens} calibration tokens ({a.granularity})")
    for col in ("fraction", "budget", "cost CPU s", "cost wall s", "bpw", "units changed", "exact-cost ratio", "KLD", "KLD p99", "same top-1"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(f"{r['fraction']:g}", f"{r['budget']:g}", f"{r['cost_cpu_s']:.1f}", f"{r['cost_wall_s']:.1f}",
                  f"{r['bpw']:.4f}", f"{100 * r['units_changed']:.1f} %", f"{r['exact_cost_ratio']:.4f}", f"{r.get('kld_mean', float('nan')):.5f}",
                  f"{r.get('kld_p99', float('nan')):.4f}", f"{r.get('same_top_p', float('nan')):.4f}")
    Console().print(t)


if __name__ == "__main__":
    main()
