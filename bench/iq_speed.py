"""ggml's quantizers on one expert matrix: the patched IQ2/IQ3 neighbour search and IQ4 grid index (cpp_patch
0008) side by side with stock ggml's loops, in one process, on the same rows and importance matrix.

Each type is timed single-threaded (CPU seconds, best of --repeat) on a Qwen3-30B-A3B expert matrix shape
(768 x 2048, Gaussian rows, a random importance matrix), after a warm-up call that builds ggml's grids; the
table gives both times, their ratio and whether the bytes are identical. The other default candidates
are listed for scale (what a candidate costs the cost pass and the writer).

    python bench/iq_speed.py [--rows 768] [--cols 2048] [--repeat 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from gemq_gguf.ggml import quant
from gemq_gguf.options import DEFAULT_TYPES



def cpu_seconds(rows: np.ndarray, name: str, imatrix: np.ndarray, repeat: int) -> tuple[float, np.ndarray]:
    """Best single-thread CPU time of quantizing `rows` to `name`, and the bytes."""
    best, out = float("inf"), np.empty(0)
    for _ in range(repeat):
        t0 = time.process_time()
        out = quant.quantize(rows, name, imatrix, threads=1)
        best = min(best, time.process_time() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=768)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((args.rows, args.cols)).astype(np.float32)
    imatrix = (rng.random(args.cols) + 0.1).astype(np.float32)
    names = list(dict.fromkeys([*quant.PATCHED_SEARCH_TYPES, *DEFAULT_TYPES]))
    results = []
    for name in names:
        quant.quantize(rows[:32], name, imatrix, threads=1)  # builds the grids, outside the timing
        fast, fast_bytes = cpu_seconds(rows, name, imatrix, args.repeat)
        row = {"type": name, "simd_s": fast, "default_candidate": name in DEFAULT_TYPES}
        if name in quant.PATCHED_SEARCH_TYPES:
            with quant.reference_search():
                ref, ref_bytes = cpu_seconds(rows, name, imatrix, args.repeat)
            row.update(stock_s=ref, speedup=ref / fast, identical=bool(np.array_equal(ref_bytes, fast_bytes)))
        results.append(row)
    table = Table(title=f"ggml quantize, one {args.rows}x{args.cols} matrix, 1 thread, CPU s (best of {args.repeat})")
    for col in ("type", "stock search", "patched", "speed-up", "same bytes", "default candidate"):
        table.add_column(col, justify="left" if col == "type" else "right")
    for r in results:
        searched = "stock_s" in r
        table.add_row(r["type"], f"{r['stock_s']:.3f}" if searched else "-", f"{r['simd_s']:.3f}",
                      f"{r['speedup']:.2f}x" if searched else "-", ("yes" if r["identical"] else "NO") if searched else "-",
                      "yes" if r["default_candidate"] else "")
    Console().print(table)
    cand = [r for r in results if r["default_candidate"]]
    before = sum(r.get("stock_s", r["simd_s"]) for r in cand)
    after = sum(r["simd_s"] for r in cand)
    print(f"all default candidates of one matrix: {before:.3f} -> {after:.3f} CPU s ({before / after:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"rows": args.rows, "cols": args.cols, "results": results,
                                         "default_candidates_s": {"stock": before, "patched": after}}, indent=1))
    if not all(r.get("identical", True) for r in results):
        raise SystemExit("the patched search changed some bytes")


if __name__ == "__main__":
    main()
