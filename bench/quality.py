#!/usr/bin/env python3
"""Quality per bit on the demo model: llama.cpp's own recipes vs gemq vs uniform expert types.

Rows (all against the same F32 reference, on the packaged eval text, context 512):
- llama-quantize recipes with an imatrix from llama-imatrix on the same calibration text:
  Q2_K, Q3_K_S, Q3_K_M, IQ3_XXS, IQ4_XS, Q4_K_M;
- gemq at expert budgets 2.5, 3.0, 3.5, 4.0: expert granularity (patched runtime) and tensor
  granularity (stock-loadable), each without and (with --router-tuning) with tuned routers;
- uniform expert types Q2_K, Q3_K, Q4_K with gemq's non-expert policy.
Columns: size, whole-file bpw, expert bpw, PPL, mean KLD, p99.9 KLD, same top, per-domain KLD.
Writes bench/out/quality.json and a Pareto plot (KLD vs whole-file bpw, log scale) to docs/quality_pareto.png.

    python bench/quality.py [--eval-chunks 16] [--budgets 2.5 3.0 3.5 4.0] [--router-tuning]
    python bench/quality.py --report bench/out/quality.json [more rows files ...]   # table + plot only
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import Bench, save_rows
from rich.console import Console
from rich.table import Table

from gemq_gguf.allocate import solve
from gemq_gguf.data import calib_texts
from gemq_gguf.options import LOSSES, TuneOptions
from gemq_gguf.plan import PlanOrigin, uniform_plan
from gemq_gguf.policy import TensorPolicy
from gemq_gguf.runtime import bin_path

RECIPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ3_XXS", "IQ4_XS", "Q4_K_M")
UNIFORM = ("Q2_K", "Q3_K", "Q4_K")


def llama_imatrix(bench: Bench, chunks: int) -> Path:
    """llama.cpp's own imatrix on the same calibration text (the packaged mix)."""
    out = bench.out_dir / "llama.imatrix.gguf"
    if not out.exists():
        text = bench.out_dir / "calib.txt"
        text.write_text("\n\n".join(calib_texts().values()))
        subprocess.run([str(bin_path("llama-imatrix")), "-m", str(bench.ref), "-f", str(text), "-o", str(out),
                        "-c", "512", "--chunks", str(chunks)], check=True, capture_output=True)
    return out


def llama_quantize(bench: Bench, imatrix: Path, recipe: str) -> Path:
    out = bench.out_dir / f"recipe-{recipe}.gguf"
    subprocess.run([str(bin_path("llama-quantize")), "--imatrix", str(imatrix), str(bench.ref), str(out), recipe],
                   check=True, capture_output=True)
    return out


def pareto_plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    families = list(dict.fromkeys(r["family"] for r in rows))
    for family, marker in zip(families, "so^xPvD*<>"):
        pts = sorted((r["file_bpw"], r["kld_mean"], r["name"]) for r in rows if r["family"] == family)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=family)
            for x, y, n in pts:
                ax.annotate(n, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("whole-file bits per weight")
    ax.set_ylabel("mean KLD vs F32 (log)")
    ax.set_title("demo MoE: quality per bit")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def print_table(rows: list[dict], model_name: str) -> None:
    table = Table(title=f"quality per bit, {model_name} (KLD vs F32, packaged eval text, ctx 512)")
    cols = ("row", "family", "MiB", "file bpw", "expert bpw", "PPL", "mean KLD", "p99.9 KLD", "same top",
            "prose", "tech", "code", "math")
    for c in cols:
        table.add_column(c, justify="left" if c in ("row", "family") else "right")
    for r in sorted(rows, key=lambda r: r["file_bpw"]):
        d = r["kld_by_domain"]
        table.add_row(r["name"], r["family"], f"{r['file_mib']:.1f}", f"{r['file_bpw']:.3f}", f"{r['expert_bpw']:.3f}",
                      f"{r['ppl']:.2f}", f"{r['kld_mean']:.4f}", f"{r['kld_p999']:.3f}", f"{100 * r['same_top_p']:.2f}%",
                      *(f"{d.get(k, float('nan')):.4f}" for k in ("prose", "tech", "code", "math")))
    Console(width=200).print(table)
    print(f"reference (F32) PPL {rows[0]['ppl_base']:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0])
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--imatrix-chunks", type=int, default=64)
    ap.add_argument("--eval-chunks", type=int, default=16, help="max 512-token chunks per eval domain")
    ap.add_argument("--router-tuning", action="store_true", help="also rows with tuned routers (slow on CPU)")
    ap.add_argument("--rt-loss", default=TuneOptions.loss, choices=LOSSES)
    ap.add_argument("--rt-lr", type=float, default=TuneOptions.lr)
    ap.add_argument("--rt-epochs", type=int, default=1)
    ap.add_argument("--rows", nargs="+", choices=("recipes", "uniform", "gemq"), default=["recipes", "uniform", "gemq"],
                    help="row families to run (split a long run; merge with --report)")
    ap.add_argument("--granularities", nargs="+", choices=("expert", "tensor"), default=["expert", "tensor"])
    ap.add_argument("--name", default="quality", help="rows go to OUT_DIR/NAME.json, saved after every row")
    ap.add_argument("--non-expert", metavar="TYPE", help="non-expert policy of the gemq/uniform rows (as convert.py)")
    ap.add_argument("--tensor-type", action="append", default=[], metavar="PATTERN=TYPE")
    ap.add_argument("--report", type=Path, nargs="+", help="no runs: table and plot from these rows files")
    ap.add_argument("--out-dir", type=Path, default=Path("bench/out"))
    ap.add_argument("--plot", type=Path, default=Path("docs/quality_pareto.png"))
    args = ap.parse_args()
    if args.report:
        rows = [r for f in args.report for r in json.loads(f.read_text())["rows"]]
        print_table(rows, args.model)
        pareto_plot(rows, args.plot)
        return 0
    bench = Bench.open(args.model, args.out_dir, args.eval_chunks)
    bench.policy = TensorPolicy.from_args(args.tensor_type, args.non_expert)
    tag = "" if not (args.non_expert or args.tensor_type) else \
        " [" + ", ".join(([f"non-expert {args.non_expert}"] if args.non_expert else []) + args.tensor_type) + "]"
    rows: list[dict] = []

    def add(name: str, family: str, path: Path, **extra) -> None:
        rows.append({"name": name, "family": family, **extra, **bench.evaluate(path)})
        path.unlink()
        print(json.dumps(rows[-1]), flush=True)
        save_rows(args.out_dir, args.name, rows, {"args": {k: str(v) for k, v in vars(args).items()}})

    if "recipes" in args.rows:
        imatrix = llama_imatrix(bench, args.imatrix_chunks)
        for recipe in RECIPES:
            add(recipe, "llama-quantize", llama_quantize(bench, imatrix, recipe))
    if {"uniform", "gemq"} & set(args.rows):
        bench.prepare_costs(args.calib_tokens)
    layers, n_exp = list(bench.src.shape.moe_layers), bench.src.shape.n_experts
    for t in UNIFORM if "uniform" in args.rows else ():
        add(f"uniform {t}", "uniform" + tag, bench.write(f"uniform-{t}", uniform_plan(layers, n_exp, t),
                                                                 PlanOrigin("uniform", "tensor")))
    for budget in args.budgets if "gemq" in args.rows else ():
        for gran in args.granularities:
            alloc = solve("gemq", bench.problems[gran], budget, max_types=3)
            plan = bench.plan_of(alloc)
            meta = PlanOrigin("gemq", gran, budget)
            add(f"gemq {budget}", f"gemq ({gran})" + tag, bench.write(f"gemq-{gran}-{budget}", plan, meta), budget=budget)
            if args.router_tuning:
                routers = bench.tuned_routers(plan, TuneOptions(loss=args.rt_loss, lr=args.rt_lr, epochs=args.rt_epochs))
                add(f"gemq {budget} +rt", f"gemq ({gran}) +routers" + tag,
                    bench.write(f"gemq-{gran}-{budget}-rt", plan, meta, routers=routers), budget=budget)

    print_table(rows, bench.src.model_dir.name)
    print(f"calibration + costs {bench.prep_seconds:.0f} s")
    pareto_plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
