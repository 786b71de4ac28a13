"""What the non-expert costs (gemq.tensor_costs) add to a calibration, and how their magnitudes compare
with the routed experts' (the inputs of a whole-file allocation).

Times the whole-model calibration without and with the non-expert records, the expert cost table
(tensor granularity: one cost per layer-projection, like one non-expert tensor) and the non-expert
cost table; prints per category the tensors, parameters and mean / total cost at a few types.

    python bench/tensor_costs.py ../shared/models/qwen3moe-65m --calib-tokens 4096 [--tensor-tokens 2048]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from gemq_gguf.convert.hf_to_gguf import hf_to_float_gguf
from gemq_gguf.gemq.budget import calib_tokens
from gemq_gguf.gemq.costs import estimate_costs
from gemq_gguf.gemq.stats import collect_stats, load_for_calibration
from gemq_gguf.gemq.tensor_costs import tensor_cost_table
from gemq_gguf.ggml.names import tensor_category
from gemq_gguf.options import NON_EXPERT_TYPES, CalibOptions
from gemq_gguf.pipeline import open_source


def _timed(f, *args, **kwargs):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = f(*args, **kwargs)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--tensor-tokens", type=int, default=CalibOptions().tensor_tokens)
    ap.add_argument("--show", nargs="+", default=["Q2_K", "Q4_K", "Q6_K"])
    ap.add_argument("--work", type=Path, default=Path("bench-out/tensor-costs"))
    args = ap.parse_args()
    src = open_source(args.model)
    args.work.mkdir(parents=True, exist_ok=True)
    gguf = args.work / f"{src.model_dir.name}.f32.gguf"
    if not gguf.exists():
        hf_to_float_gguf(src.model_dir, gguf, "f32", tied_output=src.tied_output)
    tokens = calib_tokens(src.model_dir, CalibOptions(tokens=args.calib_tokens))
    model = load_for_calibration(src.model_dir)
    types = list(NON_EXPERT_TYPES)
    _, t_plain = _timed(collect_stats, model, src.adapter, tokens)
    stats, t_rec = _timed(collect_stats, model, src.adapter, tokens, tensor_tokens=args.tensor_tokens)
    experts, t_exp = _timed(estimate_costs, model, src.adapter, stats, stats.imatrix().means(), types=types,
                            granularity="tensor")
    table, t_tab = _timed(tensor_cost_table, stats, gguf, types)
    ts = stats.tensors
    print(f"model {src.model_dir.name}: {tokens.numel()} calibration tokens, {ts.sample_tokens} sampled for the "
          f"non-expert tensors (scale {ts.scale:g}), torch threads {torch.get_num_threads()}")
    print(f"calibration {t_plain:.1f} s; with non-expert records {t_rec:.1f} s (+{t_rec - t_plain:.1f} s); "
          f"expert costs (tensor granularity) {t_exp:.1f} s; non-expert cost table {t_tab:.1f} s")
    rows: dict[str, list[tuple[np.ndarray, int]]] = {}
    for (l, _, p), c, n in zip(experts.units, experts.cost, experts.params):
        rows.setdefault(f"experts ({p})", []).append((c, int(n)))
    for name, c, n in zip(table.names, table.cost, table.params):
        rows.setdefault(tensor_category(name, 2), []).append((c, int(n)))
    cols = [types.index(t) for t in args.show]
    head = " | ".join(f"mean {t}" for t in args.show)
    print(f"\n| category | tensors | params/tensor | {head} | total {args.show[1]} | {args.show[1]} per M params |")
    print("|---|---:|---:|" + "---:|" * (len(cols) + 2))
    for cat, items in rows.items():
        c = np.stack([i[0] for i in items])
        params = sum(i[1] for i in items)
        mean = " | ".join(f"{c[:, j].mean():.3g}" for j in cols)
        total = c[:, cols[1]].sum()
        print(f"| {cat} | {len(items)} | {params // len(items):,} | {mean} | {total:.3g} | {total / params * 1e6:.3g} |")
    print("\nnotes:", *[n for n in table.notes if "fallback" not in n][:12], sep="\n  ")


if __name__ == "__main__":
    main()
