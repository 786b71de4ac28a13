"""llama.cpp imatrix files: exact layout, round trip, llama-quantize's means, and our statistics as an imatrix."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from gemq_gguf.errors import GemqError
from gemq_gguf.ggml.imatrix import Imatrix, expert_imatrix, read_imatrix, write_imatrix


def _imatrix() -> Imatrix:
    rng = np.random.default_rng(0)
    return Imatrix(sums={"blk.0.ffn_down_exps.weight": rng.random((4, 64), dtype=np.float32) * 10,
                         "blk.0.attn_q.weight": rng.random((1, 32), dtype=np.float32)},
                   counts={"blk.0.ffn_down_exps.weight": np.array([5, 0, 2, 9], np.float32),
                           "blk.0.attn_q.weight": np.array([16], np.float32)},
                   datasets=["calib.txt"], chunk_count=4, chunk_size=512)


def test_round_trip_and_layout(tmp_path: Path) -> None:
    im = _imatrix()
    write_imatrix(tmp_path / "im.gguf", im)
    back = read_imatrix(tmp_path / "im.gguf")
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["calib.txt"], 4, 512)
    for name in im.sums:
        np.testing.assert_array_equal(back.sums[name], im.sums[name])
        np.testing.assert_array_equal(back.counts[name], im.counts[name])
    r = GGUFReader(tmp_path / "im.gguf")
    assert r.fields["general.type"].contents() == "imatrix" and "general.architecture" not in r.fields
    shapes = {t.name: [int(n) for n in t.shape] for t in r.tensors}  # ggml ne order, as llama-imatrix writes
    assert shapes["blk.0.ffn_down_exps.weight.in_sum2"] == [64, 4]
    assert shapes["blk.0.ffn_down_exps.weight.counts"] == [1, 4]
    assert [t.name for t in r.tensors][0].startswith("blk.0.attn_q")  # names sorted


def test_means_follow_llama_quantize() -> None:
    im = _imatrix()
    m = im.means()["blk.0.ffn_down_exps.weight"]
    np.testing.assert_allclose(m[0], im.sums["blk.0.ffn_down_exps.weight"][0] / 5, rtol=1e-6)
    assert (m[1] == 1.0).all()  # no tokens: uniform weights
    np.testing.assert_array_equal(expert_imatrix(im.means(), 0, "down", 4), m)
    assert expert_imatrix(im.means(), 0, "gate", 4) is None
    with pytest.raises(GemqError, match="4 matrices"):
        expert_imatrix(im.means(), 0, "down", 8)


def test_not_an_imatrix(tmp_path: Path) -> None:
    (tmp_path / "old.dat").write_bytes(b"\x01\x00\x00\x00junk")
    with pytest.raises(GemqError, match="not a GGUF imatrix"):
        read_imatrix(tmp_path / "old.dat")
    with pytest.raises(GemqError, match="does not exist"):
        read_imatrix(tmp_path / "missing.gguf")




@pytest.mark.usefixtures("one_torch_thread")
def test_statistics_as_imatrix(tmp_path: Path) -> None:
    """Our calibration's imatrix: per-expert mean of x² (gate/up) and of act(gate x)·up x squared (down)."""
    from tiny_models import make_tiny_model
    from transformers import AutoModelForCausalLM

    from gemq_gguf.archs import adapter_for
    from gemq_gguf.gemq.stats import collect_stats

    path = make_tiny_model("qwen3_moe", tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    adapter = adapter_for(model.config.architectures)
    stats = collect_stats(model, adapter, torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(0)),
                          store_dtype=torch.float32)
    write_imatrix(tmp_path / "im.gguf", stats.imatrix())
    means = read_imatrix(tmp_path / "im.gguf").means()
    s, block = stats.layers[1], adapter.moe_block(model, 1)
    tok, _ = s.routed(2)
    x = s.x[tok].double()
    w = {k: v.detach().double() for k, v in adapter.experts(block).weights(2).items()}
    h = block.experts.act_fn(x @ w["gate"].T) * (x @ w["up"].T)  # qwen3_moe: SwiGLU
    np.testing.assert_allclose(means["blk.1.ffn_gate_exps.weight"][2], (x ** 2).mean(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(means["blk.1.ffn_up_exps.weight"][2], (x ** 2).mean(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(means["blk.1.ffn_down_exps.weight"][2], (h ** 2).mean(0).numpy(), rtol=1e-4)
    assert sum(int(s.counts.sum()) for s in stats.layers.values()) == 2 * 64 * 2  # layers × tokens × top-k
