"""Layer-streamed statistics equal the whole-model pass (issue 15's acceptance), in float64.

The streamed pass runs the same layer computations on the same values, so block inputs, gradients at
the MoE outputs, routing, imatrix sums and the loss are compared for exact equality.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHS, make_tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from gemq_gguf.archs import adapter_for, load_text_model
from gemq_gguf.errors import GemqError
from gemq_gguf.gemq.layer_source import LayerSource
from gemq_gguf.gemq import streaming
from gemq_gguf.gemq.stats import CalibStats, collect_stats
from gemq_gguf.gemq.streaming import model_bytes, stream_stats, use_streaming

FIELDS = ("x", "g", "ids", "weights", "in_sum2", "down_sum2", "counts")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tokens(n_seq: int = 5, seq_len: int = 24) -> torch.Tensor:
    return torch.randint(0, 384, (n_seq, seq_len), generator=torch.Generator().manual_seed(1))


def _full(path: Path, tokens: torch.Tensor, **kw) -> CalibStats:
    # eager experts: transformers' grouped_mm kernels take no float64
    model = load_text_model(path, dtype=torch.float64, experts_implementation="eager").eval()
    return collect_stats(model, adapter_for(model.config.architectures), tokens, store_dtype=torch.float64, **kw)


def _streamed(path: Path, tokens: torch.Tensor, **kw) -> tuple[CalibStats, LayerSource]:
    adapter = adapter_for(AutoConfig.from_pretrained(path).architectures)
    source = LayerSource(path, adapter, torch.float64, experts_implementation="eager")
    return stream_stats(source, adapter, tokens, store_dtype=torch.float64, **kw), source


def _assert_equal(full: CalibStats, streamed: CalibStats) -> None:
    assert streamed.loss == full.loss
    assert streamed.layers.keys() == full.layers.keys()
    for l, a in full.layers.items():
        for f in FIELDS:
            assert torch.equal(getattr(a, f), getattr(streamed.layers[l], f)), (l, f)
    assert full.layers[max(full.layers)].g.abs().sum() > 0


@pytest.mark.parametrize("arch", [*ARCHS, "gemma4", "hunyuan_moe", "sarvam_moe", "afmoe", "laguna", "gemma4_vl", "llama4_vl",
                                  "glm4v_moe_vl", "dots3_vl", "minimax_m3_vl", "qwen3_omni_moe_vl",
                                  "step3p7_vl"])
def test_streamed_equals_whole_model(tmp_path: Path, arch: str) -> None:
    """The first five families, Gemma 4, Hunyuan-MoE v1, Sarvam-MoE, AfMoE, Laguna and seven multimodal checkpoints;
    sampled Fisher targets (drawn in the same order), an uneven last batch; deepseek_v2 has a dense first layer and
    shared experts, qwen2_moe a gated shared expert, gemma4 decoder layers called with a positional (None) per-layer
    input, hunyuan_moe per-expert checkpoint tensors (as released) and a float32 router, sarvam_moe Bailing-V2's fused
    q/k/v (split by transformers on load), afmoe its muP embedding scale (in the model's forward, not a layer's),
    laguna a rope and a mask per layer kind; the multimodal ones keep their text model under a prefix
    (`model.language_model.`, Llama 4's `language_model.model.` and `language_model.lm_head.`) beside a vision tower
    that is never read; GLM-4.5V's text model is a made causal LM (`TextForCausalLM`) whose per-expert tensors are
    fused by its wrapper's conversions; dots3-note's wrapper is saved with the released names (`model.layers.`,
    `vision_encoder.`, `audio_encoder.`), MiniMax-M3's with them and per-expert tensors (`language_model.model.`,
    `block_sparse_moe.experts.E.w1`), which its wrapper's conversions rename and fuse; Qwen3-Omni's under its
    thinker (`thinker.model.`); Step-3.7's experts outside the experts interface."""
    path = make_tiny_model(arch, tmp_path / arch)
    tokens = _tokens()
    kw = dict(batch_size=2, labels="sampled", seed=3)
    streamed, source = _streamed(path, tokens, **kw)
    _assert_equal(_full(path, tokens, **kw), streamed)
    assert all(p.device.type == "meta" for p in source.model.parameters())  # every part dropped again
    read = [key for keys in source._parts.values() for _, key in keys]
    assert read and not [k for k in read if any(w in k for w in ("vision", "projector", "audio"))]  # never read


def test_spilled_sharded_tied(tmp_path: Path) -> None:
    """Boundary states and statistics in memmap files, a checkpoint in several shards, tied embeddings."""
    path = tmp_path / "m"
    make_tiny_model("qwen3_moe", path, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.save_pretrained(path, max_shard_size="1MB")
    assert (path / "model.safetensors.index.json").is_file()
    tokens = _tokens(4, 16)
    kw = dict(batch_size=3, labels="data")
    streamed, _ = _streamed(path, tokens, ram_limit=0, boundary_limit=0, work_dir=tmp_path / "work", **kw)
    assert streamed.work_dir is not None and streamed.work_dir.parent == tmp_path / "work"
    _assert_equal(_full(path, tokens, **kw), streamed)


def test_needs_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(GemqError, match="safetensors"):
        LayerSource(tmp_path, None, torch.float32)  # type: ignore[arg-type]


def test_auto_streams_only_what_does_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_tiny_model("mixtral", tmp_path / "m")
    size = model_bytes(path, torch.float32)
    assert size > 0
    assert use_streaming(path, "stream") and not use_streaming(path, "full")
    monkeypatch.setattr(streaming, "available_memory", lambda device: 2 * size + 2)
    assert not use_streaming(path, "auto")
    monkeypatch.setattr(streaming, "available_memory", lambda device: 2 * size - 2)
    assert use_streaming(path, "auto")
    (path / "model.safetensors").unlink()
    assert not use_streaming(path, "auto")  # not safetensors: the whole model


@pytest.mark.slow
def test_budget_file_identical_streamed(tmp_path: Path) -> None:
    """`--calib-memory stream` writes the same bytes and the same allocation as the whole-model pass
    (costs computed on the skeleton, two layers' weights at a time)."""
    from gemq_gguf.cli import main as convert_main
    path = make_tiny_model("deepseek_v2", tmp_path / "hf")
    outs = {}
    for memory in ("full", "stream"):
        outs[memory] = tmp_path / f"{memory}.gguf"
        assert convert_main([str(path), "--budget", "3.0", "-o", str(outs[memory]), "--calib-tokens", "1024",
                             "--seq-len", "128", "--calib-memory", memory]) == 0
    assert outs["full"].read_bytes() == outs["stream"].read_bytes()
    reports = {m: json.loads(o.with_suffix(".json").read_text())["allocation"] for m, o in outs.items()}
    assert reports["full"]["units"] == reports["stream"]["units"]


def test_costs_on_the_skeleton(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cost estimation on the streamed skeleton, one layer's weights held at a time, equals it on the
    whole model."""
    from gemq_gguf.gemq import costs
    from gemq_gguf.gemq.costs import estimate_costs
    from gemq_gguf.gemq.streaming import streamed_costs
    path = make_tiny_model("qwen2_moe", tmp_path / "m", num_hidden_layers=3)
    tokens = _tokens(2, 32)
    streamed, source = _streamed(path, tokens)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
    adapter = adapter_for(model.config.architectures)
    kw = dict(types=("Q3_K", "Q6_K"), granularity="expert-proj", dtype=torch.float64)
    full = estimate_costs(model, adapter, streamed, streamed.imatrix().means(), **kw)
    events: list[tuple[str, int]] = []
    hold, layer_costs = source.hold, costs._layer_costs
    monkeypatch.setattr(source, "hold", lambda l, window=2: (events.append(("load", l)), hold(l, window))[1])
    monkeypatch.setattr(costs, "_layer_costs", lambda jobs, *a: (events.append(("costs", jobs.layer)),
                                                                 layer_costs(jobs, *a))[1])
    table = streamed_costs(source, adapter, streamed, streamed.imatrix().means(), **kw)
    # no look-ahead: a layer's costs are done before the next layer loads, and one layer is held at a time
    assert events == [(e, l) for l in range(3) for e in ("load", "costs")] and len(source._held) == 0
    assert all(p.device.type == "meta" for p in source.model.parameters())
    assert (full.cost > 0).all() and torch.equal(torch.from_numpy(full.cost), torch.from_numpy(table.cost))


def test_per_token_layer_inputs_are_a_clear_error() -> None:
    """A decoder layer fed per-token tensors besides the hidden states (Gemma's per-layer inputs) cannot be
    streamed with arguments recorded once per batch shape: one line naming the fix, not a TypeError."""
    from gemq_gguf.gemq.layer_pass import _Probe
    probe = _Probe(0, {})
    probe(torch.zeros(1, 2, 4), None)  # None placeholders are fine
    with pytest.raises(GemqError, match="--calib-memory full"):
        probe(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))


def test_bf16_layer_loads_narrow_and_widens_exactly(tmp_path: Path) -> None:
    """A bf16 checkpoint's layer is loaded at bf16 and widened to the float32 skeleton one parameter at a
    time (half the bytes through transformers' expert fusing): the values equal `from_pretrained`'s float32
    ones bit for bit, and the dropped layer's meta parameters are float32 again."""
    path = make_tiny_model("qwen3_moe", tmp_path / "m", num_hidden_layers=2, dtype=torch.bfloat16)
    source = LayerSource(path, adapter_for(AutoConfig.from_pretrained(path).architectures), torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    want = dict(model.model.layers[1].named_parameters())
    with source.loaded(1) as layer:
        got = dict(layer.named_parameters())
        assert got.keys() == want.keys()
        for name, p in got.items():
            assert p.dtype == torch.float32 and torch.equal(p, want[name]), name
    assert all(p.device.type == "meta" and p.dtype == torch.float32 for p in source.layers[1].parameters())
