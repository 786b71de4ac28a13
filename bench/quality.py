#!/usr/bin/env python3
"""Quality per byte (issue 16): llama.cpp's imatrix recipes vs gemq files of the same size, on one model.

Rows (every file against the same F32 GGUF, on the packaged eval text, context 512):
- recipes: llama-quantize Q2_K, IQ3_XXS, Q3_K_S, Q3_K_M, IQ4_XS, Q4_K_M, Q5_K_M, Q6_K with an imatrix
  from llama-imatrix on the calibration tokens gemq uses (decoded to text, same count);
- wholefile: `convert.py --target-size <recipe bytes>` at expert granularity (patched runtime) and at
  tensor granularity (stock-loadable), one pair per recipe (`--granularities expert-proj` adds the finest);
- budget: `convert.py --budget B` (routed experts only, non-expert tensors by the default policy);
- uniform: every routed expert Q4_K (`--budget 4.5 --types Q4_K`: the same calibration and imatrix);
- tasa: the TASA claim, "3.5 bits per expert weight (whole-file allocation) at least as good as uniform
  Q4_K experts": `--target-size` = the bytes of the `--budget 3.5` file (3.5 bits per routed-expert weight
  plus the default non-expert policy), whole-file allocated, against uniform Q4_K experts with the same
  policy (one bit per expert weight more); and, for the equal-size view, `--target-size` = the uniform
  Q4_K file's bytes.
Every gemq row is a `convert.py` run sharing one statistics cache (OUT/stats), so the calibration runs
once per model and code version.

Everything lands in bench/out/<model>/: the F32 reference, the llama imatrix, the statistics cache and
one JSON per row (rows/), keyed by what the row depends on (recipe rows by llama.cpp's build and the
imatrix/eval settings, gemq rows also by a hash of the package sources), so a rerun computes only the
missing rows. The table (markdown, also OUT/quality.md) and a Pareto plot (docs/quality_pareto_<model>.png)
come from the cached rows.

    python bench/quality.py --model demo --rows recipes budget uniform
    python bench/quality.py --model ../shared/models/qwen3moe-65m --rows wholefile tasa
    python bench/quality.py --model demo --report          # table + plot from the cached rows only
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import Bench

REPO = Path(__file__).resolve().parent.parent
RECIPES = ("Q2_K", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_XS", "Q4_K_M", "Q5_K_M", "Q6_K")
ROW_KINDS = ("recipes", "budget", "uniform", "wholefile", "tasa")
TASA_BUDGET = 3.5
UNIFORM_TYPE, UNIFORM_BPW = "Q4_K", 4.5
SIZE_TOLERANCE = 0.01  # issue 16: gemq rows within 1 % of the recipe's file size


def model_label(model: str) -> str:
    return "demo" if model == "demo" else Path(model).resolve().name


def source_hash() -> str:
    """The package sources a gemq row depends on (any edit recomputes the gemq rows)."""
    h = hashlib.sha256()
    for f in sorted((REPO / "gemq_gguf").rglob("*.py")):
        h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    for f in sorted((REPO / "cpp_patch").glob("*")) if (REPO / "cpp_patch").is_dir() else ():
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:10]


def llama_build() -> str:
    from gemq_gguf.runtime import bin_path
    st = bin_path("llama-quantize").stat()
    return hashlib.sha256(f"{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:8]


class Runner:
    """One model's rows: cached on disk, computed only when missing."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.label = model_label(args.model)
        self.out = args.out_dir / self.label
        self.rows_dir = self.out / "rows"
        self.rows_dir.mkdir(parents=True, exist_ok=True)
        self.bench: Bench | None = None
        self.code = source_hash()
        self.settings = f"c{args.calib_tokens}-ev{args.eval_chunks}"

    # -- cache --------------------------------------------------------------------------------------
    def cached(self, key: str) -> dict | None:
        p = self.rows_dir / f"{key}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def store(self, key: str, row: dict) -> dict:
        tmp = self.rows_dir / f"{key}.json.tmp"
        tmp.write_text(json.dumps(row, indent=1, default=str))
        tmp.replace(self.rows_dir / f"{key}.json")
        print(json.dumps({k: v for k, v in row.items() if k != "report"}), flush=True)
        return row

    def ensure_bench(self) -> Bench:
        if self.bench is None:
            self.bench = Bench.open(self.args.model, self.out, self.args.eval_chunks)
        return self.bench

    def evaluate(self, path: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = self.ensure_bench().evaluate(path)
        res["file_bytes"] = path.stat().st_size
        res["eval_seconds"] = round(time.perf_counter() - t0, 1)
        return res

    # -- recipes ------------------------------------------------------------------------------------
    def calib_text(self) -> tuple[Path, int]:
        """gemq's calibration tokens, decoded: llama-imatrix sees the same text, as many 512-token chunks."""
        from transformers import AutoTokenizer

        from gemq_gguf.gemq.budget import calib_tokens
        from gemq_gguf.options import CalibOptions
        src = self.ensure_bench().src
        calib = CalibOptions(tokens=self.args.calib_tokens)
        rows = calib_tokens(src.model_dir, calib)
        path = self.out / f"calib-{self.args.calib_tokens}.txt"
        if not path.exists():
            tok = AutoTokenizer.from_pretrained(src.model_dir)
            path.write_text("\n\n".join(tok.decode(r.tolist(), skip_special_tokens=True) for r in rows))
        return path, int(rows.shape[0])

    def llama_imatrix(self) -> Path:
        from gemq_gguf.runtime import bin_path
        out = self.out / f"llama-imatrix-{self.args.calib_tokens}.gguf"
        if not out.exists():
            text, chunks = self.calib_text()
            t0 = time.perf_counter()
            run([str(bin_path("llama-imatrix")), "-m", str(self.ensure_bench().ref), "-f", str(text),
                 "-o", str(out), "-c", "512", "--chunks", str(chunks), "-t", str(self.args.threads)])
            print(f"llama-imatrix: {time.perf_counter() - t0:.0f} s", flush=True)
        return out

    def recipe(self, name: str) -> dict:
        key = f"recipe-{name}-{self.settings}-{llama_build()}"
        if (row := self.cached(key)) is not None:
            return row
        from gemq_gguf.runtime import bin_path
        imatrix = self.llama_imatrix()
        path = self.out / f"recipe-{name}.gguf"
        run([str(bin_path("llama-quantize")), "--imatrix", str(imatrix), str(self.ensure_bench().ref), str(path),
             name, str(self.args.threads)])
        try:
            return self.store(key, {"name": name, "family": "llama-quantize (imatrix)", "kind": "recipe",
                                    **self.evaluate(path)})
        finally:
            path.unlink(missing_ok=True)

    # -- gemq rows (convert.py) ---------------------------------------------------------------------
    def gemq(self, key: str, name: str, family: str, kind: str, flags: list[str], **extra: Any) -> dict:
        key = f"{key}-{self.settings}-{self.code}"
        if (row := self.cached(key)) is not None:
            return row
        self.ensure_bench()
        path = self.out / f"{key}.gguf"
        report = self.rows_dir / f"{key}.report.json"
        cmd = [sys.executable, str(REPO / "convert.py"), self.args.model, "-o", str(path), "--no-verify",
               "--calib-tokens", str(self.args.calib_tokens), "--cache-dir", str(self.out / "stats"),
               "--report-json", str(report), "--heatmap", str(self.out / "last-heatmap.png"), *flags]
        t0 = time.perf_counter()
        run(cmd)
        seconds = round(time.perf_counter() - t0, 1)
        try:
            rep = json.loads(report.read_text())
            return self.store(key, {"name": name, "family": family, "kind": kind, "flags": flags,
                                    "convert_seconds": seconds, **extra, **self.evaluate(path),
                                    "report_file": rep.get("file"), "whole_file": rep.get("whole_file"),
                                    "non_expert": non_expert_summary(rep)})
        finally:
            path.unlink(missing_ok=True)

    def budget(self, b: float, gran: str = "expert") -> dict:
        return self.gemq(f"budget-{b}-{gran}", f"gemq --budget {b}", f"gemq --budget ({gran})", "budget",
                         ["--budget", str(b), "--granularity", gran], budget=b)

    def uniform(self) -> dict:
        return self.gemq(f"uniform-{UNIFORM_TYPE}", f"uniform {UNIFORM_TYPE} experts", "uniform experts", "uniform",
                         ["--budget", str(UNIFORM_BPW), "--types", UNIFORM_TYPE, "--granularity", "tensor"])

    def wholefile(self, target: int, gran: str, name: str, kind: str = "wholefile", **extra: Any) -> dict:
        return self.gemq(f"{kind}-{target}-{gran}", name, f"gemq whole-file ({gran})", kind,
                         ["--target-size", str(target), "--granularity", gran], target_bytes=target, **extra)


def non_expert_summary(rep: dict) -> dict | None:
    """A whole-file report's non-expert choices: bpw and tensors per type (None for other rows)."""
    sec = rep.get("non_expert")
    if not sec:
        return None
    counts: dict[str, int] = {}
    for t in sec["tensors"]:
        counts[t["type"]] = counts.get(t["type"], 0) + 1
    return {"bpw": sec["bpw"], "params": sec["params"], "types": counts}


def run(cmd: list[str]) -> None:
    """A heavy step under nice; its output only when it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    p = subprocess.run(["nice", "-n", "10", *cmd], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}")


def compute(r: Runner, kinds: list[str], grans: list[str], budgets: list[float], recipes: list[str]) -> None:
    if "recipes" in kinds:
        for name in recipes:
            r.recipe(name)
    if "uniform" in kinds:
        r.uniform()
    if "budget" in kinds:
        for b in budgets:
            r.budget(b)
    if "tasa" in kinds:
        ref = r.budget(TASA_BUDGET)
        r.wholefile(ref["file_bytes"], "expert", f"whole-file @ --budget {TASA_BUDGET} size", kind="tasa",
                    target_of=f"gemq --budget {TASA_BUDGET}")
        uni = r.uniform()
        r.wholefile(uni["file_bytes"], "expert", f"whole-file @ uniform {UNIFORM_TYPE} size", kind="tasa",
                    target_of=f"uniform {UNIFORM_TYPE} experts")
    if "wholefile" in kinds:
        for gran in grans:
            for name in recipes:
                rec = r.recipe(name)
                r.wholefile(rec["file_bytes"], gran, f"whole-file @ {name}", target_of=name)


# -- report ---------------------------------------------------------------------------------------------
def current_rows(r: Runner) -> list[dict]:
    """The cached rows of the current settings: recipes of this llama build, gemq rows of this code."""
    rows = []
    for p in sorted(r.rows_dir.glob("*.json")):
        if p.name.endswith(".report.json"):
            continue
        key = p.stem
        if f"-{r.settings}-" not in key + "-":
            continue
        if key.startswith("recipe-") and key.endswith(llama_build()) or key.endswith(r.code):
            rows.append(json.loads(p.read_text()))
    return rows


def pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.1f} %"


def markdown(rows: list[dict], label: str, args: argparse.Namespace) -> str:
    lines = [f"Model `{label}`; calibration {args.calib_tokens} tokens (gemq and llama-imatrix), eval "
             f"{args.eval_chunks} chunks of 512 per domain; KLD against the F32 GGUF. Sorted by file size.", "",
             "| row | family | bytes | MiB | vs target | file bpw | expert bpw | PPL | mean KLD | p99.9 KLD | same top "
             "| prose | tech | code | math |", "|" + "---|" * 15]
    for x in sorted(rows, key=lambda x: (x["file_bytes"], x["family"])):
        d = x["kld_by_domain"]
        vs = f"{100 * (x['file_bytes'] / x['target_bytes'] - 1):+.3f} %" if "target_bytes" in x else ""
        lines.append(f"| {x['name']} | {x['family']} | {x['file_bytes']:,} | {x['file_mib']:.2f} | {vs} | "
                     f"{x['file_bpw']:.3f} | {x['expert_bpw']:.3f} | {x['ppl']:.3f} | {x['kld_mean']:.5f} | "
                     f"{x['kld_p999']:.3f} | {100 * x['same_top_p']:.2f} % | "
                     + " | ".join(f"{d.get(k, float('nan')):.5f}" for k in ("prose", "tech", "code", "math")) + " |")
    if rows:
        lines.append(f"\nF32 reference PPL {rows[0]['ppl_base']:.3f}.")
    lines += ["", *targets(rows)]
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, from the rows present (a missing row says so)."""
    rec = {x["name"]: x for x in rows if x["kind"] == "recipe"}
    wf = {(x["target_of"], x["family"]): x for x in rows if x["kind"] == "wholefile"}
    out = ["| recipe | recipe KLD | whole-file (expert) KLD | vs recipe | whole-file (tensor) KLD | vs recipe "
           "| expert vs tensor |", "|" + "---|" * 7]
    for name in RECIPES:
        if name not in rec:
            continue
        e, t = wf.get((name, "gemq whole-file (expert)")), wf.get((name, "gemq whole-file (tensor)"))
        k = rec[name]["kld_mean"]
        out.append(f"| {name} | {k:.5f} | " + (f"{e['kld_mean']:.5f} | {pct(e['kld_mean'], k)}" if e else "- | -")
                   + " | " + (f"{t['kld_mean']:.5f} | {pct(t['kld_mean'], k)}" if t else "- | -")
                   + " | " + (pct(e["kld_mean"], t["kld_mean"]) if e and t else "-") + " |")
    by = {x["name"]: x for x in rows if x["kind"] in ("uniform", "tasa", "budget")}
    uni = by.get(f"uniform {UNIFORM_TYPE} experts")
    out.append("")
    for name in (f"gemq --budget {TASA_BUDGET}", f"whole-file @ --budget {TASA_BUDGET} size",
                 f"whole-file @ uniform {UNIFORM_TYPE} size"):
        if uni and name in by:
            x = by[name]
            out.append(f"- TASA: {name} ({x['file_mib']:.2f} MiB, expert bpw {x['expert_bpw']:.3f}) KLD "
                       f"{x['kld_mean']:.5f} vs uniform {UNIFORM_TYPE} experts ({uni['file_mib']:.2f} MiB) "
                       f"{uni['kld_mean']:.5f}: {pct(x['kld_mean'], uni['kld_mean'])}")
    return out


def pareto_plot(rows: list[dict], path: Path, label: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    families = list(dict.fromkeys(x["family"] for x in sorted(rows, key=lambda x: x["kind"])))
    for family, marker in zip(families, "so^xPvD*<>"):
        pts = sorted((x["file_bpw"], x["kld_mean"], x["name"]) for x in rows if x["family"] == family)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=family,
                linestyle="-" if len(pts) > 2 else ":")
        if family.startswith("llama") or family.startswith("uniform") or "budget" in family:
            for px, py, n in pts:
                ax.annotate(n.replace("gemq ", ""), (px, py), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("whole-file bits per weight")
    ax.set_ylabel("mean KLD vs F32 (log)")
    ax.set_title(f"{label}: quality per bit (packaged eval text, ctx 512)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="'demo' or a checkpoint folder")
    ap.add_argument("--rows", nargs="*", choices=ROW_KINDS, default=list(ROW_KINDS),
                    help="row kinds to compute (missing rows only); none with --report")
    ap.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    ap.add_argument("--granularities", nargs="+", choices=("expert", "tensor", "expert-proj"), default=["expert", "tensor"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, TASA_BUDGET])
    ap.add_argument("--calib-tokens", type=int, default=8192, help="gemq calibration = llama-imatrix tokens")
    ap.add_argument("--eval-chunks", type=int, default=4, help="max 512-token chunks per eval domain")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="no runs: table and plot from the cached rows")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "out")
    ap.add_argument("--plot", type=Path, help="default docs/quality_pareto_<model>.png")
    args = ap.parse_args()
    r = Runner(args)
    if not args.report:
        compute(r, args.rows, args.granularities, args.budgets, args.recipes)
    rows = current_rows(r)
    if not rows:
        print("no cached rows for these settings")
        return 1
    md = markdown(rows, r.label, args)
    (r.out / "quality.md").write_text(md + "\n")
    print(md)
    pareto_plot(rows, args.plot or REPO / "docs" / f"quality_pareto_{r.label}.png", r.label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
