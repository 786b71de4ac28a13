#!/usr/bin/env python3
"""Router fine-tuning on the demo model: KLD and routing shift without tuning, with `ce`, with `kd`, and
with progressive refinement, at each budget (issue #5).

One calibration and one cost table serve every row; per budget the same plan is written without and
with tuned routers (progressive has its own final plan). Columns:
- llama.cpp: mean KLD / same-top vs the F32 reference, on the packaged eval text (gemq_gguf.evaluate,
  `--eval-chunks` chunks of 512 per domain). Needs a runtime that loads the file: stock llama.cpp
  for `--granularity tensor` (the default here), the patched one for `expert`.
- HF side, on the same eval text (first `--hf-chunks` chunks per domain): the model with every expert
  replaced by ggml's round trip (activations unquantized): routing shift vs full precision, top-64
  bucketed KL (router_ft.kd_loss) and CE.
Target (issue #5): tuning lowers KLD by >= 10 % at 2.5 bpw and at least halves the routing shift.

    python bench/router_tuning.py [--model DIR|demo] [--budgets 2.5 3.0] [--granularity tensor]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import Bench
from rich.console import Console
from rich.table import Table

from gemq_gguf.allocate import solve
from gemq_gguf.data import eval_texts
from gemq_gguf.errors import GemqError
from gemq_gguf.gemq.budget import calibrate
from gemq_gguf.gemq.costs import estimate_costs
from gemq_gguf.gemq.progressive import progressive_allocation, restore_experts_, whole_model_measure
from gemq_gguf.gemq.router_ft import (
    ModelRunner,
    quantize_experts_,
    router_tensors,
    score,
    teacher_pass,
    tune_quantized,
)
from gemq_gguf.options import (
    DEFAULT_TYPES,
    LOSSES,
    AllocOptions,
    CalibOptions,
    TuneOptions,
)
from gemq_gguf.plan import PlanOrigin


def eval_tokens(model_dir: Path, chunks: int, ctx: int = 512) -> torch.Tensor:
    """The first `chunks` windows of `ctx` tokens of every packaged eval domain (BOS first)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for text in eval_texts().values():
        ids = tok(text, add_special_tokens=True)["input_ids"]
        rows += [ids[i * ctx:(i + 1) * ctx] for i in range(min(chunks, len(ids) // ctx))]
    return torch.tensor(rows, dtype=torch.long)


class RouterBench:
    """The bench state: calibrated model, costs, teachers, and the original routers to reset to."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bench = Bench.open(args.model, Path(args.out_dir), args.eval_chunks)
        src = self.bench.src
        self.calib = CalibOptions(tokens=args.calib_tokens, seq_len=args.seq_len, seed=args.seed)
        t0 = time.perf_counter()
        c = calibrate(src.model_dir, src.adapter, self.calib, self.bench.out_dir)
        self.model, self.bench.imatrix, self.tokens = c.whole_model(), c.imatrix, c.tokens
        self.problem = estimate_costs(self.model, src.adapter, c.stats, self.bench.imatrix, types=DEFAULT_TYPES,
                                      granularity=args.granularity, cache=self.bench.cache, progress=True).problem()
        del c
        self.eval = eval_tokens(src.model_dir, args.hf_chunks)
        self.teacher = teacher_pass(self.model, src.adapter, self.tokens, progress=True)
        self.eval_teacher = teacher_pass(self.model, src.adapter, self.eval, progress=True)
        self.routers0 = {n: p.detach().clone() for n, p in router_tensors(self.model, src.adapter).items()}
        self.prep_seconds = time.perf_counter() - t0

    def reset(self) -> None:
        """Full-precision experts and the original routers."""
        restore_experts_(self.model, self.bench.src.adapter, self.bench.ref)
        with torch.no_grad():
            for n, p in router_tensors(self.model, self.bench.src.adapter).items():
                p.copy_(self.routers0[n])

    def hf_side(self) -> dict[str, Any]:
        s = score(self.model, self.bench.src.adapter, self.eval, self.eval_teacher)
        return {"hf_kd": s.kd, "hf_ce": s.ce, "shift": s.mean_shift, "route_kl": s.route, "shift_per_layer": s.shift}

    def evaluate(self, path: Path) -> dict[str, Any]:
        try:
            return self.bench.evaluate(path)
        except GemqError as e:  # e.g. a mixed-type file on a runtime without the expert-group patch
            return {"kld_mean": None, "same_top_p": None, "llama_error": str(e)}

    def tuned_row(self, budget: float, variant: str, lr: float, epochs: int) -> dict[str, Any]:
        """One plan at `budget`, its routers untouched (`none`) or tuned with loss `variant`."""
        src, a = self.bench.src, self.args
        t0 = time.perf_counter()
        alloc = solve("gemq", self.problem, budget, max_types=3)
        plan = self.bench.plan_of(alloc)
        self.reset()
        quantize_experts_(self.model, src.adapter, plan, self.bench.imatrix, self.bench.cache)
        routers, tuning = None, None
        if variant != "none":
            tuned = tune_quantized(ModelRunner(self.model, src.adapter), self.tokens, self.teacher,
                                   TuneOptions(loss=variant, lr=lr, epochs=epochs), batch_size=a.batch_size, seed=a.seed)
            routers, tuning = tuned.routers, tuned.report
        row = {"budget": budget, "variant": variant, "lr": lr, "epochs": epochs, "bpw": alloc.bpw, **self.hf_side()}
        if a.llama:
            meta = PlanOrigin("gemq", a.granularity, budget)
            row.update(self.evaluate(self.bench.write(f"rt-{a.granularity}-{budget}-{variant}", plan, meta,
                                                      routers=routers)))
        else:
            row.update(kld_mean=None, same_top_p=None)
        return {**row, "tuning": tuning, "seconds": time.perf_counter() - t0}

    def progressive_row(self, budget: float) -> dict[str, Any]:
        """`--progressive K` to `budget`, from the full-precision costs, tuned at every step."""
        src, a = self.bench.src, self.args
        meta = PlanOrigin("gemq", a.granularity, budget)
        t0 = time.perf_counter()
        self.reset()
        tune = TuneOptions(loss=a.progressive_loss, lr=a.lr[0], epochs=a.epochs[0], progressive=a.progressive)
        runner = ModelRunner(self.model, src.adapter, self.bench.imatrix, self.bench.cache)
        opts = AllocOptions(budget, granularity=a.granularity)
        measure = whole_model_measure(runner, self.bench.ref, self.tokens, list(self.problem.types), opts, self.calib)
        res = progressive_allocation(runner, src.shape, self.tokens, self.problem, measure, opts, tune, self.calib)
        path = self.bench.write(f"rt-{a.granularity}-{budget}-progressive", self.bench.plan_of(res.allocation), meta,
                                routers=res.tuning.routers)
        return {"budget": budget, "variant": f"progressive {a.progressive} ({a.progressive_loss})",
                "bpw": res.allocation.bpw, **self.hf_side(), **self.evaluate(path), "steps": res.steps,
                "seconds": time.perf_counter() - t0}


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    for h in ("budget", "variant", "lr", "epochs", "kept", "expert bpw", "llama KLD", "vs none", "same top", "HF KL@64",
              "HF CE", "routing shift", "vs none"):
        table.add_column(h, justify="right")
    base = {r["budget"]: r for r in rows if r["variant"] == "none"}
    for r in rows:
        b = base.get(r["budget"], r)
        rel = None if r["kld_mean"] is None or not b["kld_mean"] else r["kld_mean"] / b["kld_mean"] - 1
        srel = None if not b["shift"] else r["shift"] / b["shift"]
        table.add_row(f"{r['budget']:g}", r["variant"], f"{r.get('lr', '-')}", f"{r.get('epochs', '-')}",
                      f"{(r.get('tuning') or {}).get('kept_epoch', '-')}", f"{r['bpw']:.3f}", _fmt(r["kld_mean"], ".5f"),
                      _fmt(rel, "+.1%"), _fmt(r["same_top_p"], ".2%"), f"{r['hf_kd']:.5f}", f"{r['hf_ce']:.4f}",
                      f"{r['shift']:.2%}", _fmt(srel, ".2f") + "x")
    console = Console()
    console.width = max(console.width, 140)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo", help="checkpoint folder, or 'demo'")
    ap.add_argument("--out-dir", default="bench/out/router_tuning")
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0])
    ap.add_argument("--granularity", choices=("expert", "expert-proj", "tensor"), default="tensor")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-chunks", type=int, default=4, help="llama.cpp eval: chunks of 512 per domain")
    ap.add_argument("--hf-chunks", type=int, default=2, help="HF-side routing/KL: chunks of 512 per domain")
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-4], help="one row per lr x epochs x variant")
    ap.add_argument("--epochs", type=int, nargs="+", default=[1])
    ap.add_argument("--no-llama", dest="llama", action="store_false",
                    help="HF-side columns only (no GGUF written): quick sweeps of lr / epochs / loss")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--progressive", type=int, default=3)
    ap.add_argument("--progressive-loss", choices=LOSSES, default="ce")
    ap.add_argument("--variants", nargs="+", choices=("none", *LOSSES, "progressive"),
                    default=["none", *LOSSES, "progressive"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progressive-budgets", type=float, nargs="*", default=None,
                    help="budgets that get a progressive row (default: all; progressive is the slow row on CPU)")
    args = ap.parse_args(argv)
    args.progressive_budgets = args.budgets if args.progressive_budgets is None else args.progressive_budgets
    rb = RouterBench(args)
    out = Path(args.out_dir) / f"router_tuning-{args.granularity}.json"
    rows: list[dict[str, Any]] = []
    for budget in args.budgets:  # saved after each row: a long CPU run keeps what it finished
        for variant in args.variants:
            if variant == "progressive" and budget not in args.progressive_budgets:
                continue
            if variant == "progressive":
                rows.append(rb.progressive_row(budget))
            else:
                combos = [(args.lr[0], args.epochs[0])] if variant == "none" else \
                    [(lr, ep) for lr in args.lr for ep in args.epochs]
                rows += [rb.tuned_row(budget, variant, lr, ep) for lr, ep in combos]
            out.write_text(json.dumps({"args": vars(args), "prep_seconds": rb.prep_seconds, "rows": rows},
                                      indent=1, default=str))
            print(f"row {budget} {variant}: {json.dumps({k: rows[-1][k] for k in ('kld_mean', 'hf_kd', 'shift')})}",
                  flush=True)
    title = (f"{rb.bench.src.model_dir.name}: router tuning ({args.granularity}, {args.calib_tokens} calib tokens, "
             f"batch {args.batch_size})")
    print_table(rows, title)
    print(f"rows: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
