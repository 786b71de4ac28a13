"""Costs of the non-expert tensors (gemq.tensor_costs): each equals the directly measured Fisher-weighted
output change of its module with that one weight quantized (float64), the layer-streamed statistics give
the same costs, the imatrix entries are Σ x², and the allowed types follow shapes and imatrix needs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from tiny_models import make_tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from gemq_gguf.archs import adapter_for
from gemq_gguf.gemq import tensor_costs
from gemq_gguf.gemq.cache import StatsCache
from gemq_gguf.gemq.layer_source import LayerSource
from gemq_gguf.gemq.stats import CalibStats, collect_stats
from gemq_gguf.gemq.streaming import stream_stats
from gemq_gguf.gemq.tensor_costs import tensor_cost_table
from gemq_gguf.ggml.quant import roundtrip
from gemq_gguf.ggml.types import matrix_bits
from gemq_gguf.options import CalibOptions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TYPES = ["IQ2_XXS", "Q2_K", "Q4_K", "Q8_0"]
ALL = 10**6  # tensor_tokens: every calibration token sampled (scale 1)


def _tokens(n_seq: int = 5, seq_len: int = 24) -> torch.Tensor:
    return torch.randint(0, 384, (n_seq, seq_len), generator=torch.Generator().manual_seed(1))


def _model(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()


def _stats(model: torch.nn.Module, tokens: torch.Tensor, tensor_tokens: int = ALL) -> CalibStats:
    return collect_stats(model, adapter_for(model.config.architectures), tokens, batch_size=2, store_dtype=torch.float64,
                         labels="sampled", seed=3, tensor_tokens=tensor_tokens)


def _built(root: Path, arch: str, **overrides) -> tuple[Path, Path]:
    from gemq_gguf.convert.hf_to_gguf import hf_to_float_gguf
    path = make_tiny_model(arch, root / "hf", **overrides)
    return path, hf_to_float_gguf(path, root / "f32.gguf", "f32")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """llama.cpp's llama architecture: the converter permutes q/k rows."""
    return _built(tmp_path_factory.mktemp("tcost-mixtral"), "mixtral")


@pytest.fixture(scope="module")
def qwen3_tied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Tied embeddings and no output tensor in the GGUF (llama.cpp's qwen3moe reuses token_embd)."""
    return _built(tmp_path_factory.mktemp("tcost-qwen3"), "qwen3_moe", tie_word_embeddings=True)


def _gguf_weight(gguf: Path, name: str) -> np.ndarray:
    t = next(t for t in GGUFReader(gguf).tensors if t.name == name)
    return np.asarray(t.data, dtype=np.float64)


def _hf_order(w_gguf: np.ndarray, w_hf: np.ndarray) -> np.ndarray:
    """perm with w_gguf[perm[i]] == w_hf[i], by exact row equality (independent of the fingerprints)."""
    index = {r.tobytes(): i for i, r in enumerate(w_gguf)}
    return np.array([index[r.tobytes()] for r in w_hf])


def _measured(model: torch.nn.Module, module: str, tokens: torch.Tensor, new: torch.Tensor, g: torch.Tensor) -> float:
    """Σ (g ⊙ Δy)² with Δy the module's output change when its weight becomes `new` (the rest unchanged)."""
    m = model.get_submodule(module)
    outs = []
    h = m.register_forward_hook(lambda mod, a, o: outs.append(o.detach().reshape(-1, o.shape[-1])))
    old = m.weight
    try:
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
            m.weight = torch.nn.Parameter(new, requires_grad=False)  # a separate parameter: unties a tied head
            model(input_ids=tokens, use_cache=False)
    finally:
        m.weight = old
        h.remove()
    return float(((g * (outs[1] - outs[0])) ** 2).sum())


def _quantized_hf(gguf: Path, name: str, w_hf: torch.Tensor, t: str, imatrix: dict) -> torch.Tensor:
    """What the writer ships for `name` at type t, back in the HF module's row order."""
    w = _gguf_weight(gguf, name)
    im = imatrix.get(name)
    q = roundtrip(w.astype(np.float32), t, None if im is None else im.reshape(-1)).astype(np.float64)
    return torch.from_numpy(q[_hf_order(w, w_hf.detach().numpy())])


@pytest.mark.parametrize("name,t", [("blk.0.attn_q.weight", "Q4_K"), ("blk.1.attn_k.weight", "IQ2_XXS"),
                                    ("blk.1.attn_output.weight", "Q2_K"), ("output.weight", "Q4_K"),
                                    ("token_embd.weight", "Q2_K")])
def test_cost_equals_measured_output_change(mixtral: tuple[Path, Path], name: str, t: str) -> None:
    path, gguf = mixtral
    model, tokens = _model(path), _tokens()
    stats = _stats(model, tokens)
    table = tensor_cost_table(stats, gguf, TYPES, dtype=torch.float64)
    use = next(u for u in stats.tensors.uses if u.name == name)
    w_hf = model.get_submodule(use.module).weight
    if name.endswith("attn_q.weight"):  # the converter's rope permute is exercised
        assert not np.array_equal(_hf_order(_gguf_weight(gguf, name), w_hf.detach().numpy()), np.arange(w_hf.shape[0]))
    new = _quantized_hf(gguf, name, w_hf, t, stats.imatrix().means())
    expected = _measured(model, use.module, tokens, new, use.g)
    assert expected > 0
    assert table.cost[table.names.index(name), TYPES.index(t)] == pytest.approx(expected, rel=1e-11)


def test_imatrix_entries_are_sums_of_squares(mixtral: tuple[Path, Path]) -> None:
    path, _ = mixtral
    model, tokens = _model(path), _tokens()
    imatrix = _stats(model, tokens, tensor_tokens=24).imatrix()
    sums: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(m).register_forward_hook(
        lambda mod, a, o, n=n: sums.__setitem__(n, sums.get(n, 0) + (a[0].reshape(-1, a[0].shape[-1]) ** 2).sum(0)))
        for m, n in [("model.layers.0.self_attn.q_proj", "blk.0.attn_k.weight"),
                     ("model.layers.1.self_attn.o_proj", "blk.1.attn_output.weight"), ("lm_head", "output.weight")]]
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    for h in handles:
        h.remove()
    for n, s in sums.items():
        np.testing.assert_allclose(imatrix.sums[n][0], s.numpy(), rtol=1e-6)
        assert imatrix.counts[n].tolist() == [tokens.numel()]
    assert "token_embd.weight" not in imatrix.sums  # llama.cpp collects none for a row lookup


@pytest.mark.parametrize("model", ["mixtral", "qwen3_tied"])
def test_streamed_costs_equal_whole_model(request: pytest.FixtureRequest, model: str) -> None:
    """A 2-sequence sample of 5 (scale 2.5), sampled Fisher targets, an uneven last batch; q/k permuted
    by the converter (mixtral), the head recorded as token_embd (tied)."""
    path, gguf = request.getfixturevalue(model)
    tokens = _tokens()
    full = _stats(_model(path), tokens, tensor_tokens=48)
    adapter = adapter_for(AutoConfig.from_pretrained(path).architectures)
    source = LayerSource(path, adapter, torch.float64, experts_implementation="eager")
    streamed = stream_stats(source, adapter, tokens, batch_size=2, store_dtype=torch.float64, labels="sampled",
                            seed=3, tensor_tokens=48)
    a, b = full.tensors, streamed.tensors
    assert a.seqs.tolist() == b.seqs.tolist() == [0, 2] and a.scale == 2.5
    assert torch.equal(a.ids, b.ids) and a.inputs.keys() == b.inputs.keys()
    for k in a.inputs:
        assert torch.equal(a.inputs[k], b.inputs[k]) and torch.equal(a.sum2[k], b.sum2[k]), k
    for u, v in zip(a.uses, b.uses, strict=True):
        assert (u.name, u.x) == (v.name, v.x) and torch.equal(u.g, v.g) and torch.equal(u.rows, v.rows), u.name
        assert u.g.abs().sum() > 0, u.name
    ta = tensor_cost_table(full, gguf, TYPES, dtype=torch.float64)
    tb = tensor_cost_table(streamed, gguf, TYPES, dtype=torch.float64)
    assert ta.names == tb.names and np.array_equal(ta.cost, tb.cost) and np.array_equal(ta.bits, tb.bits)


def test_cached_statistics_and_table(mixtral: tuple[Path, Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path, gguf = mixtral
    tokens = _tokens()
    stats = _stats(_model(path), tokens, tensor_tokens=48)
    cache = StatsCache(tmp_path)
    entry = cache.calibration(path, tokens, CalibOptions(), "cpu")
    entry.save(stats)
    loaded = entry.load()
    want = tensor_cost_table(stats, gguf, TYPES, dtype=torch.float64)
    store = cache.tensor_costs(entry.key, TYPES, None, gguf, "cpu")
    got = tensor_cost_table(loaded, gguf, TYPES, dtype=torch.float64, store=store)
    assert np.array_equal(got.cost, want.cost) and got.names == want.names
    monkeypatch.setattr(tensor_costs, "_tensor_cost", None)  # a second run computes nothing
    again = tensor_cost_table(loaded, gguf, TYPES, dtype=torch.float64, store=store)
    assert np.array_equal(again.cost, want.cost) and again.notes == want.notes


def test_allowed_types_fallback_and_left_out(tmp_path: Path) -> None:
    """DeepSeek-V2: a dense layer with 320-wide down rows (llama.cpp's fallback), kv_b split by the converter."""
    path, gguf = _built(tmp_path, "deepseek_v2", intermediate_size=320)
    table = tensor_cost_table(_stats(_model(path), _tokens(), tensor_tokens=48), gguf, TYPES, dtype=torch.float64)
    row = {n: i for i, n in enumerate(table.names)}
    assert np.isinf(table.cost[row["token_embd.weight"], TYPES.index("IQ2_XXS")])  # no imatrix for a lookup
    assert np.isfinite(table.cost[row["output.weight"]]).all()
    down = row["blk.0.ffn_down.weight"]
    assert np.isfinite(table.cost[down]).all()
    assert table.bits[down, TYPES.index("Q4_K")] == matrix_bits(256, 320, "Q5_0")
    assert table.bits[down, TYPES.index("IQ2_XXS")] == matrix_bits(256, 320, "IQ4_NL")
    assert not any("kv_b" in n for n in table.names) and any("attn_kv_b" in n for n in table.notes)
    assert {"blk.1.ffn_gate_shexp.weight", "blk.0.ffn_up.weight", "blk.2.attn_q_b.weight"} <= set(table.names)
    assert not any("_exps" in n or "ffn_gate_inp" in n for n in table.names)


def test_tied_embeddings_sum_both_uses(qwen3_tied: tuple[Path, Path]) -> None:
    """Qwen3-MoE with tied embeddings: only token_embd in the GGUF; its cost is lookup + head, and it gets
    the head's imatrix (so types that need one are allowed)."""
    path, gguf = qwen3_tied
    model, tokens = _model(path), _tokens()
    stats = _stats(model, tokens)
    table = tensor_cost_table(stats, gguf, TYPES, dtype=torch.float64)
    assert "output.weight" not in table.names
    i, j = table.names.index("token_embd.weight"), TYPES.index("IQ2_XXS")
    means = stats.imatrix().means()
    assert "token_embd.weight" in means and np.isfinite(table.cost[i, j])
    w_hf = model.get_input_embeddings().weight
    new = _quantized_hf(gguf, "token_embd.weight", w_hf, "IQ2_XXS", means)
    uses = {u.kind: u for u in stats.tensors.uses if u.name == "token_embd.weight"}
    expected = sum(_measured(model, u.module, tokens, new, u.g) for u in uses.values())
    assert set(uses) == {"embedding", "linear"}
    assert table.cost[i, j] == pytest.approx(expected, rel=1e-11)
