"""Held-out perplexity of the dense SmolLM2 and the demo MoE (top-2/3/4) on the shipped eval text, plus the exactness
checks of the build (padded dense == dense, saved checkpoint == reference MoE)."""
from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import time

import torch

from . import build, moefy, pad, text

log = logging.getLogger(__name__)

EVAL_JSON = "EVAL.json"


def shipped_eval() -> pathlib.Path:
    return pathlib.Path(__file__).with_name(EVAL_JSON)


def recorded_eval() -> dict:
    return json.loads(shipped_eval().read_text())


@contextlib.contextmanager
def routed(dense, experts, routers, K, downs):
    """Temporarily replace every FFN of the dense model with the reference MoE block."""
    orig = [layer.mlp for layer in dense.model.layers]
    try:
        for l, layer in enumerate(dense.model.layers):
            layer.mlp = moefy.MoEFFN(orig[l], experts[l], routers[l], K, downs[l])
        yield dense
    finally:
        for layer, mlp in zip(dense.model.layers, orig):
            layer.mlp = mlp


def domain_ppl(model, windows: dict, desc: str, progress: bool = True) -> dict:
    from tqdm.auto import tqdm
    res = {}
    for d, w in windows.items():
        res[d] = round(text.perplexity(model, w, progress=lambda it: tqdm(
            it, desc=f"ppl {desc} {d}", unit="batch", disable=not progress, leave=False)), 3)
    log.info("ppl %s: %s", desc, res)
    return res


@torch.no_grad()
def expert_load(moe, windows: torch.Tensor, E: int, K: int) -> list:
    """Per layer [min, max] fraction of tokens routed to an expert (uniform: K/E), measured on the HF model."""
    L = len(moe.model.layers)
    hits, ntok = torch.zeros(L, E), torch.zeros(L)

    def count(l):
        def hook(mod, inp, out):  # router output: logits (transformers 4) or (logits, scores, indices) (5)
            lg = (out[0] if isinstance(out, tuple) else out).reshape(-1, E)
            hits[l] += torch.zeros_like(lg).scatter_(1, lg.topk(K, 1).indices, 1.0).sum(0)
            ntok[l] += len(lg)
        return hook

    blocks = [getattr(layer, "mlp", None) or layer.block_sparse_moe for layer in moe.model.layers]
    hooks = [b.gate.register_forward_hook(count(l)) for l, b in enumerate(blocks)]
    try:
        moe(input_ids=windows)
    finally:
        for hk in hooks:
            hk.remove()
    frac = hits / ntok[:, None]
    return [[round(a, 4), round(b, 4)] for a, b in zip(frac.min(1).values.tolist(), frac.max(1).values.tolist())]


@torch.no_grad()
def evaluate_demo(out: pathlib.Path, parts: dict, top_ks=(2, 3, 4), n_windows: int = text.EVAL_WINDOWS,
                  progress: bool = True, json_path=None) -> dict:
    """Evaluate a just-built demo model (parts from build_demo_model(return_parts=True)); json_path, if given, is
    rewritten after every measurement (partial results survive an interruption)."""
    from transformers import AutoModelForCausalLM

    dense, tok, res, K0 = parts["dense"], parts["tok"], parts["res"], parts["top_k"]
    E = len(res["experts"][0])
    t0 = time.time()

    def checkpoint():
        if json_path:
            r["eval_time_s"] = round(time.time() - t0, 1)
            pathlib.Path(json_path).write_text(json.dumps(r, indent=1) + "\n")

    with build._threads(build.BUILD_THREADS):
        wins = text.domain_windows(tok, "eval", n_windows)
        probe = wins["prose"][:1]
        r: dict = {"seq_len": text.SEQ_LEN, "windows_per_domain": n_windows,
                   "tokens_per_domain": n_windows * text.SEQ_LEN, "experts": E, "default_top_k": K0, "refit": parts["refit"],
                   "model_safetensors_sha256": parts["sha256"], "build_timings_s": {
                       k: round(v, 1) for k, v in parts["timings"].items()}}
        ref_logits = dense(input_ids=probe).logits
        padded = pad.pad_llama(dense, build.HIDDEN)
        r["padded_dense_max_abs_logit_diff"] = (padded(input_ids=probe).logits - ref_logits).abs().max().item()
        r["dense_logit_abs_max"] = ref_logits.abs().max().item()
        del padded
        r["ppl"] = {"dense": domain_ppl(dense, wins, "dense", progress)}
        checkpoint()
        r["router_recall_mean"] = {str(K): round(sum(v) / len(v), 4) for K, v in res["recall"].items()}

        moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        r["ppl"][f"moe_top{K0}"] = domain_ppl(moe, wins, f"MoE top-{K0} (checkpoint)", progress)
        r["expert_load_min_max_per_layer"] = expert_load(moe, wins["prose"][:4], E, K0)
        rts0 = moefy.routers_for(res, K0)
        with routed(dense, res["experts"], rts0, K0, parts["downs"]):
            r["checkpoint_vs_reference_max_abs_logit_diff"] = (
                moe(input_ids=probe).logits - dense(input_ids=probe).logits).abs().max().item()
        del moe
        checkpoint()
        for K in top_ks:
            if K == K0:
                continue
            rts = moefy.routers_for(res, K)
            _, downs = build.moefy_model(dense, parts["calib"], K, res, refit=parts["refit"], progress=progress)
            with routed(dense, res["experts"], rts, K, downs):
                r["ppl"][f"moe_top{K}"] = domain_ppl(dense, wins, f"MoE top-{K} (reference)", progress)
            checkpoint()
    r["eval_time_s"] = round(time.time() - t0, 1)
    return r
