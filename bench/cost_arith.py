"""CPU time of the GEMQ cost arithmetic for one expert at a given shape (default Qwen3-30B-A3B: hidden 2048,
768 channels, 256 tokens per expert = 4,096 calibration tokens x top-8 / 128 experts), float32, random weights.

Per row: the expert's full-precision pass (once per expert, shared by all candidates) and one candidate type's
arithmetic at expert granularity (gate, up and down quantized together) and at expert-proj granularity (three
costs, one per projection), at each fraction of rows: whole matrices (today's path at fraction 1, and at
fractions < 1 before `patched_delta`: whole matrices with the unsampled rows exact) against the sampled rows
only (`patched_delta`). Quantization is not included (ggml's time, linear in rows: docs/RESULTS.md). Run it
with OMP_NUM_THREADS=1 for one core's numbers.

    python bench/cost_arith.py [--tokens 256] [--hidden 2048] [--ffn 768] [--fractions 1,0.25,0.125] [--reps 5]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from gemq_gguf.gemq.costs import patched_sse, sample_rows, weighted_sse, with_rows
from gemq_gguf.gemq.experts_math import ExpertFn, RowPatch, expert_delta, expert_pass

PROJS = ("gate", "up", "down")


def cpu_per_call(fn, reps: int) -> float:
    fn()  # warm-up
    t0 = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--fractions", default="1,0.25,0.125")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(a.tokens, a.hidden, generator=gen)
    gw = torch.randn(a.tokens, a.hidden, generator=gen)
    w = {"gate": torch.randn(a.ffn, a.hidden, generator=gen) / 40, "up": torch.randn(a.ffn, a.hidden, generator=gen) / 40,
         "down": torch.randn(a.hidden, a.ffn, generator=gen) / 30}
    q = {p: v + 0.01 * torch.randn(v.shape, generator=gen) for p, v in w.items()}
    silu = torch.nn.functional.silu
    fn = ExpertFn(glu=lambda g, u: silu(g) * u, act=silu, bias={}, finish=None)
    base_s = cpu_per_call(lambda: expert_pass(x, w, fn), a.reps)
    base = expert_pass(x, w, fn)
    t = Table(title=f"cost arithmetic per expert, {a.tokens} tokens, hidden {a.hidden} x {a.ffn}, float32, "
                    f"torch threads {torch.get_num_threads()} (CPU s per call)")
    for col in ("fraction", "path", "expert pass", "1 type, expert", "1 type, expert-proj (3 costs)", "vs dense"):
        t.add_column(col, justify="right")
    dense_ref: dict[str, float] = {}
    for f in (float(v) for v in a.fractions.split(",")):
        rows = {p: sample_rows(w[p].shape[0], f, 0, 0, p) for p in PROJS}
        full = {p: with_rows(w[p], rows[p], q[p] if rows[p] is None else q[p][torch.from_numpy(rows[p])]) for p in PROJS}
        dense_e = cpu_per_call(lambda: weighted_sse(expert_delta(base, full), gw), a.reps)
        dense_p = cpu_per_call(lambda: [weighted_sse(expert_delta(base, {p: full[p]}), gw) for p in PROJS], a.reps)
        dense_ref.setdefault("e", dense_e)
        dense_ref.setdefault("p", dense_p)
        t.add_row(f"{f:g}", "whole matrices", f"{base_s:.4f}", f"{dense_e:.4f}", f"{dense_p:.4f}",
                  f"{dense_e / dense_ref['e']:.2f} / {dense_p / dense_ref['p']:.2f}")
        if f < 1:
            patch = {p: RowPatch(torch.from_numpy(rows[p]), q[p][torch.from_numpy(rows[p])]) for p in PROJS}
            got, want = patched_sse(base, patch, gw), weighted_sse(expert_delta(base, full), gw)
            assert np.isclose(got, want, rtol=1e-3), (got, want)
            pe = cpu_per_call(lambda: patched_sse(base, patch, gw), a.reps)
            pp = cpu_per_call(lambda: [patched_sse(base, {p: patch[p]}, gw) for p in PROJS], a.reps)
            t.add_row(f"{f:g}", "sampled rows only", f"{base_s:.4f}", f"{pe:.4f}", f"{pp:.4f}",
                      f"{pe / dense_ref['e']:.2f} / {pp / dense_ref['p']:.2f}")
    Console(width=160).print(t)


if __name__ == "__main__":
    main()
