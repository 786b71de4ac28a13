"""The writer's threads: one expert group quantized the old way (one matrix at a time, ggml's row chunks
spread over the threads) and the new way (`_Planner._group_bytes`: an expert a thread), side by side in one
process, on random bf16 experts of Qwen3-30B-A3B's shape (768 x 2048). Prints wall and CPU seconds, their
ratios and whether the bytes are equal. On few cores the two are close; the new way is meant for many
(a matrix has only 24 row chunks of 32).

    python bench/writer_threads.py [--experts 32] [--types IQ3_XXS,Q4_K]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from gemq_gguf.convert.writer import _floats, _Planner
from gemq_gguf.ggml.quant import cpu_threads, quantize
from gemq_gguf.policy import TensorPolicy


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--types", default="IQ3_XXS,Q4_K")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((args.experts, 768, 2048)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    imatrix = (rng.random(2048) + 0.1).astype(np.float32)
    name, members = "blk.0.ffn_gate_exps.weight", list(range(args.experts))
    table = Table(title=f"{args.experts} bf16 experts 768x2048, {cpu_threads()} threads")
    for col in ("type", "matrix at a time: wall s", "CPU s", "expert a thread: wall s", "CPU s", "wall ratio", "same bytes"):
        table.add_column(col, justify="left" if col == "type" else "right")
    for t in args.types.split(","):
        quantize(_floats(data[0, :32]), t, imatrix)  # grids built outside the timing
        old, w_old, c_old = timed(lambda: np.stack([quantize(_floats(data[e]), t, imatrix) for e in members]))
        planner = _Planner({}, TensorPolicy(), {name: imatrix}, None, False, {})
        new, w_new, c_new = timed(lambda: planner._group_bytes(name, data, members, t))
        table.add_row(t, f"{w_old:.2f}", f"{c_old:.2f}", f"{w_new:.2f}", f"{c_new:.2f}", f"{w_old / w_new:.2f}x",
                      "yes" if np.array_equal(old, new) else "NO")
    Console().print(table)


if __name__ == "__main__":
    main()
