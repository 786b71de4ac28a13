#!/usr/bin/env python3
"""How much of a quantized MoE's error is routing? An oracle bound for router tuning (issue 16).

Router tuning can only change which experts a token reaches and with what weights. This bench gives
the quantized model (every routed expert replaced by ggml's round trip of its planned type, the same
bytes the file holds) the full-precision model's routing, exactly (the router's output of the FP model
on the same tokens, selection and weights), and measures the full-vocabulary KL to the FP model on the
packaged eval text, HF side:
- own: the quantized model routes itself (what the file does);
- oracle ids: FP's expert selection, weights from its own router renormalised over those experts;
- oracle: FP's selection and weights (the routing shift is zero).
If even `oracle` lowers the KL by less than the issue's 10 %, no router weights that restore the FP
routing can reach the target; the rest of the error is the experts' own output error.

    python bench/routing_bound.py MODEL --plan REPORT.json --imatrix IMATRIX.gguf [--chunks 4]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from gemq_gguf.data import eval_texts
from gemq_gguf.ggml.imatrix import read_imatrix
from gemq_gguf.pipeline import open_source
from gemq_gguf.plan import load_plan
from gemq_gguf.gemq.router_ft import quantize_experts_
from gemq_gguf.gemq.routing import routing_shift
from gemq_gguf.gemq.stats import load_for_calibration


def gates(model: torch.nn.Module, adapter: Any) -> list[torch.nn.Module]:
    shape = adapter.moe_shape(model.config)
    return [adapter.router(adapter.moe_block(model, l)) for l in shape.moe_layers]


@contextlib.contextmanager
def hooked(mods: list[torch.nn.Module], fn: Any) -> Iterator[None]:
    handles = [m.register_forward_hook(fn(i)) for i, m in enumerate(mods)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def chunks(tokenizer: Any, n: int, ctx: int = 512) -> dict[str, torch.Tensor]:
    out = {}
    for dom, text in eval_texts().items():
        ids = tokenizer(text)["input_ids"]
        k = min(n, len(ids) // ctx)
        out[dom] = torch.tensor(ids[:k * ctx]).reshape(k, ctx)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--plan", type=Path, required=True, help="a conversion report (or plan JSON)")
    ap.add_argument("--imatrix", type=Path, required=True, help="the imatrix the file was quantized with")
    ap.add_argument("--chunks", type=int, default=4, help="512-token chunks per eval domain")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from transformers import AutoTokenizer
    src = open_source(args.model)
    tok = AutoTokenizer.from_pretrained(src.model_dir)
    fp = load_for_calibration(src.model_dir).eval()
    q = load_for_calibration(src.model_dir).eval()
    plan = load_plan(args.plan, list(src.shape.moe_layers), src.shape.n_experts)
    quantize_experts_(q, src.adapter, plan, read_imatrix(args.imatrix).means())
    fp_gates, q_gates = gates(fp, src.adapter), gates(q, src.adapter)
    rec: list[Any] = [None] * len(fp_gates)

    def record(i: int) -> Any:
        def f(mod: Any, inp: Any, out: Any) -> None:
            rec[i] = out
        return f

    def oracle(i: int) -> Any:
        return lambda mod, inp, out: rec[i]

    def oracle_ids(i: int) -> Any:
        def f(mod: Any, inp: Any, out: Any) -> Any:
            logits, _, _ = out
            ids = rec[i][2]
            w = torch.softmax(logits.float(), -1).gather(-1, ids)
            if getattr(mod, "norm_topk_prob", True):
                w = w / w.sum(-1, keepdim=True)
            return logits, w.to(logits.dtype), ids
        return f

    def own_ids(store: list) -> Any:
        def mk(i: int) -> Any:
            def f(mod: Any, inp: Any, out: Any) -> None:
                store[i] = out[2]
            return f
        return mk

    kl = {"own": [], "oracle ids": [], "oracle": []}
    fp_routes: dict[int, list] = {i: [] for i in range(len(fp_gates))}
    q_routes: dict[int, list] = {i: [] for i in range(len(fp_gates))}
    with torch.no_grad():
        for dom, x in chunks(tok, args.chunks).items():
            for row in x:
                batch = row[None]
                with hooked(fp_gates, record):
                    ref = F.log_softmax(fp(input_ids=batch, use_cache=False).logits.float(), -1)
                for i in range(len(fp_gates)):
                    fp_routes[i].append(rec[i][2])
                for name, hook in (("own", None), ("oracle ids", oracle_ids), ("oracle", oracle)):
                    store: list = [None] * len(q_gates)
                    ctx = hooked(q_gates, hook) if hook else hooked(q_gates, own_ids(store))
                    with ctx:
                        lq = F.log_softmax(q(input_ids=batch, use_cache=False).logits.float(), -1)
                    if hook is None:
                        for i in range(len(q_gates)):
                            q_routes[i].append(store[i])
                    kl[name].append((ref.exp() * (ref - lq)).sum(-1).flatten())
    means = {k: float(torch.cat(v).mean()) for k, v in kl.items()}
    shift = routing_shift({i: torch.cat(v) for i, v in fp_routes.items()}, {i: torch.cat(v) for i, v in q_routes.items()})
    res = {"model": str(src.model_dir), "plan": str(args.plan), "chunks_per_domain": args.chunks, "kl": means,
           "vs_own": {k: means[k] / means["own"] - 1 for k in means},
           "routing_shift_by_layer": shift, "routing_shift": sum(shift.values()) / len(shift)}
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
