"""Router tuning layer-streamed (router_stream.py) equals it on the whole model in memory, in float64:
the teacher pass, the training steps (same batches, same AdamW steps), and `--progressive`'s
re-measurement of the quantized-and-tuned model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_streaming import _assert_equal
from tiny_models import make_tiny_model

from gemq_gguf.archs import adapter_for, load_text_model
from gemq_gguf.gemq.layer_source import LayerSource
from gemq_gguf.gemq.router_ft import ModelRunner, finetune_routers, score
from gemq_gguf.gemq.router_stream import StreamedRunner
from gemq_gguf.gemq.stats import collect_stats
from gemq_gguf.gemq.streaming import stream_stats
from gemq_gguf.plan import uniform_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tokens(n_seq: int = 5, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(0, 384, (n_seq, seq_len), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module", params=["qwen2_moe", "deepseek_v3"])
def arch_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """qwen2_moe: softmax router and a gated shared expert (two trained router tensors per layer);
    deepseek_v3: sigmoid scores with a correction bias, group-limited top-k, shared experts, a dense first layer."""
    overrides = {"first_k_dense_replace": 1, "num_hidden_layers": 3} if request.param == "deepseek_v3" else {}
    return request.param, make_tiny_model(request.param, tmp_path_factory.mktemp(request.param) / "hf", **overrides)


def _runners(path: Path) -> tuple[ModelRunner, StreamedRunner]:
    model = load_text_model(path, dtype=torch.float64, experts_implementation="eager").eval()
    adapter = adapter_for(model.config.architectures)
    source = LayerSource(path, adapter, torch.float64, experts_implementation="eager")
    return ModelRunner(model, adapter), StreamedRunner(source, adapter)


def test_teacher_pass_streamed_equals_in_memory(arch_path) -> None:
    _, path = arch_path
    full, streamed = _runners(path)
    tokens = _tokens()
    a, b = full.teacher_pass(tokens), streamed.teacher_pass(tokens)
    assert torch.equal(a.logp, b.logp) and torch.equal(a.idx, b.idx) and a.ce == b.ce
    assert a.routing.keys() == b.routing.keys() == a.router_logits.keys() == b.router_logits.keys()
    for l in a.routing:
        assert torch.equal(a.routing[l], b.routing[l]) and torch.equal(a.router_logits[l], b.router_logits[l]), l
    assert all(p.device.type == "meta" for p in streamed.source.model.parameters())


@pytest.mark.parametrize("loss", ["kd+route", "ce", "route"])
def test_finetune_streamed_equals_in_memory(arch_path, loss: str) -> None:
    """2 epochs of 3 steps (batches 2, 2, 1) on the Q2_K/Q4_K-quantized experts: the same loss history and
    router weights, bit for bit (measured: the same operations on the same values), and the same score of the
    tuned model. `route` alone runs no head: nothing but the per-layer terms flows down."""
    arch, path = arch_path
    full, streamed = _runners(path)
    tokens = _tokens()
    teacher = full.teacher_pass(tokens)
    shape = full.adapter.moe_shape(full.model.config)
    plan = uniform_plan(list(shape.moe_layers), shape.n_experts, "Q2_K")
    plan[(shape.moe_layers[-1], "down")] = ["Q4_K"] * shape.n_experts
    for runner in (full, streamed):
        runner.quantize(plan)
    histories: list[list[float]] = [[], []]
    routers = [finetune_routers(r, tokens, loss=loss, teacher=teacher, lr=1e-2, epochs=2, batch_size=2, seed=3,
                                progress=False, history=h) for r, h in zip((full, streamed), histories)]
    assert len(histories[0]) == 6
    assert histories[1] == histories[0]
    assert routers[0].keys() == routers[1].keys()
    if arch == "qwen2_moe":
        assert any(n.endswith("ffn_gate_inp_shexp.weight") for n in routers[0])
    held = full.routers()
    for n, w in routers[0].items():
        np.testing.assert_array_equal(routers[1][n], w)
        np.testing.assert_array_equal(held[n].numpy(), w)  # the model holds the last step's masters
    tuned = {n: torch.from_numpy(w) for n, w in routers[0].items()}
    assert any(not torch.equal(tuned[n], v) for n, v in StreamedRunner(streamed.source, streamed.adapter).routers().items())
    a, b = full.score(tokens, teacher, 2), streamed.score(tokens, teacher, 2)
    assert (a.kd, a.ce, a.shift, a.route) == (b.kd, b.ce, b.shift, b.route)


def test_progressive_remeasurement_streamed_equals_collect_stats(arch_path) -> None:
    """`--progressive`'s statistics of the quantized model with tuned routers: `stream_stats` on the student
    equals `collect_stats` on the in-memory model."""
    _, path = arch_path
    full, streamed = _runners(path)
    shape = full.adapter.moe_shape(full.model.config)
    plan = uniform_plan(list(shape.moe_layers), shape.n_experts, "Q3_K")
    g = torch.Generator().manual_seed(5)
    tuned = {n: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for n, v in full.routers().items()}
    for runner in (full, streamed):
        runner.quantize(plan)
        runner.set_routers(tuned)
    tokens = _tokens(4, 16)
    kw = dict(batch_size=3, labels="sampled", seed=4, store_dtype=torch.float64)
    want = collect_stats(full.model, full.adapter, tokens, **kw)
    got = stream_stats(streamed.student_source, streamed.adapter, tokens, **kw)
    _assert_equal(want, got)
    plain = collect_stats(load_text_model(path, dtype=torch.float64, experts_implementation="eager").eval(),
                          full.adapter, tokens, **kw)
    assert not torch.equal(plain.layers[shape.moe_layers[-1]].g, got.layers[shape.moe_layers[-1]].g)  # it is the student


def test_score_before_tuning_reads_checkpoint_routers(arch_path) -> None:
    """A fresh streamed runner's routers are the checkpoint's (read on first load), and its score on the
    full-precision model is the in-memory one."""
    _, path = arch_path
    full, streamed = _runners(path)
    want = full.routers()
    got = streamed.routers()
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
    tokens = _tokens(3, 16)
    teacher = full.teacher_pass(tokens)
    a = score(full.model, full.adapter, tokens, teacher, 2)
    b = streamed.score(tokens, teacher, 2)
    assert (a.kd, a.ce, a.shift, a.route) == (b.kd, b.ce, b.shift, b.route)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [("--finetune-routers", "--ft-select", "last"), ("--progressive", "2")],
                         ids=["finetune", "progressive"])
def test_budget_streamed_tuning_never_loads_the_whole_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            flags: tuple[str, ...]) -> None:
    """`--calib-memory stream` with router tuning (kd+route, the default loss) never calls
    `Calibration.whole_model` and writes the same bytes and report numbers as `--calib-memory full`."""
    import json

    from gemq_gguf.cli import main as convert_main
    from gemq_gguf.gemq import budget
    path = make_tiny_model("qwen2_moe", tmp_path / "hf")
    args = ["--budget", "3.0", "--calib-tokens", "1024", "--seq-len", "128", "--seed", "1", "--no-cache", *flags]
    outs = {m: tmp_path / f"{m}.gguf" for m in ("full", "stream")}
    assert convert_main([str(path), "-o", str(outs["full"]), *args, "--calib-memory", "full"]) == 0

    def whole_model(self: budget.Calibration) -> None:
        raise AssertionError("the streamed run loaded the whole model")
    monkeypatch.setattr(budget.Calibration, "whole_model", whole_model)
    assert convert_main([str(path), "-o", str(outs["stream"]), *args, "--calib-memory", "stream"]) == 0
    reports = {m: json.loads(o.with_suffix(".json").read_text()) for m, o in outs.items()}
    tuning = {m: {k: v for k, v in r["router_tuning"].items() if k != "seconds"} for m, r in reports.items()}
    assert tuning["full"] == tuning["stream"] and tuning["full"]["steps"] > 0
    assert tuning["full"]["routers_shipped"] or "--progressive" in flags
    assert reports["full"].get("progressive") == reports["stream"].get("progressive")
    assert outs["full"].read_bytes() == outs["stream"].read_bytes()
