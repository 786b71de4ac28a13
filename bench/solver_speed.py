"""Solver speed: HiGHS MILP vs relaxation + rounding (LP-round) vs the default 'auto' path.

Rows: lp-round (solve_lp_round); auto (solve_gemq default: lp-round, MILP only if its gap >
mip_rel_gap); milp+fixing (solve_gemq method='milp': MILP on the problem reduced by Lagrangian
variable fixing, exact); milp plain (solve_milp: HiGHS on the full model, no help).

Synthetic costs (error ~ 4^-bpw, lognormal sensitivity per layer and expert), 8 candidate types,
max 3 types per tensor. Gap = (cost - best lower bound known from any method) / cost.

    python bench/solver_speed.py                 # 10^3, 10^4, 5*10^4 units, 60 s MILP limit
    python bench/solver_speed.py --time-limit 20 --sizes 1000 10000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # synthetic_problem is a test fixture; the benchmark reuses it

from synthetic import synthetic_problem  # noqa: E402

from gemq_gguf.allocate import (  # noqa: E402
    AllocationProblem,
    solve_gemq,
    solve_lp_round,
    solve_milp,
    violations,
)

SHAPES = {  # units -> (layers, experts, projections): expert granularity up to 10^4, then expert-proj
    1000: (16, 64, (None,)),
    10000: (40, 256, (None,)),
    50000: (64, 256, ("gate", "up", "down")),
}


def problem_for(n: int, seed: int) -> tuple[AllocationProblem, str]:
    layers, experts, projs = SHAPES.get(n, (max(1, n // 256), min(n, 256), (None,)))
    gran = "expert" if projs == (None,) else "expert-proj"
    return synthetic_problem(layers, experts, projs=projs, seed=seed), f"{layers}x{experts}x{len(projs)} {gran}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    ap.add_argument("--budget", type=float, default=3.0)
    ap.add_argument("--max-types", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--mip-rel-gap", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plain-max-units", type=int, default=50000, help="skip plain HiGHS above this size")
    args = ap.parse_args()

    table = Table(title=f"Allocation solvers, 8 types, budget {args.budget} bpw, max {args.max_types} types/tensor, "
                        f"MILP limit {args.time_limit:g} s, mip_rel_gap {args.mip_rel_gap:g}")
    for col in ("units", "shape", "method", "seconds", "status", "predicted cost", "gap"):
        table.add_column(col, justify="right" if col not in ("shape", "method", "status") else "left")
    console = Console(width=150)
    for n in args.sizes:
        p, shape = problem_for(n, args.seed)
        runs = []
        t0 = time.perf_counter()
        lp = solve_lp_round(p, args.budget, args.max_types)
        runs.append(("lp-round", time.perf_counter() - t0, lp))
        t0 = time.perf_counter()
        auto = solve_gemq(p, args.budget, args.max_types, args.time_limit, args.mip_rel_gap)
        runs.append(("auto (default)", time.perf_counter() - t0, auto))
        for gap in sorted({args.mip_rel_gap, 1e-6}, reverse=True):
            t0 = time.perf_counter()
            fixed = solve_gemq(p, args.budget, args.max_types, args.time_limit, gap, method="milp")
            runs.append((f"milp+fixing, gap {gap:g}", time.perf_counter() - t0, fixed))
        if p.n_units <= args.plain_max_units:
            t0 = time.perf_counter()
            milp = solve_milp(p, args.budget, args.max_types, args.time_limit, args.mip_rel_gap)
            runs.append(("milp plain (HiGHS only)", time.perf_counter() - t0, milp))
        bounds = [a.bound for _, _, a in runs if a is not None and np.isfinite(a.bound)]
        bound = max(bounds) if bounds else float("nan")
        for name, secs, a in runs:
            if a is None:
                table.add_row(str(p.n_units), shape, name, f"{secs:.2f}", "no solution", "-", "-")
                continue
            assert not violations(p, a.type_index, args.budget, args.max_types), name
            gap = (a.total_cost - bound) / a.total_cost
            table.add_row(str(p.n_units), shape, name, f"{secs:.2f}", a.status, f"{a.total_cost:.6g}", f"{gap:.1e}")
        table.add_section()
        console.print(f"done {p.n_units} units", style="dim")
    console.print(table)


if __name__ == "__main__":
    main()
