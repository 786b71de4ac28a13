"""Router fine-tuning: routing shift, the top-K KD loss, quantized experts, and what training may touch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import _tokenizer, make_tiny_model
from transformers import AutoModelForCausalLM

from gemq_gguf.archs import adapter_for
from gemq_gguf.gemq.calib import calibration_tokens
from gemq_gguf.gemq.progressive import step_budgets
from gemq_gguf.gemq.router_ft import (
    ModelRunner,
    finetune_routers,
    kd_loss,
    quantize_experts_,
    route_loss,
    router_tensors,
    score,
    split_rows,
    teacher_pass,
    tune_quantized,
)
from gemq_gguf.gemq.routing import routing_shift
from gemq_gguf.ggml.quant import roundtrip
from gemq_gguf.options import TuneOptions
from gemq_gguf.plan import uniform_plan


def test_routing_shift_counts_changed_choices_as_sets() -> None:
    fp = {0: torch.tensor([[0, 1], [2, 3], [4, 5], [0, 2]]), 3: torch.tensor([[1, 2], [1, 2], [1, 2], [1, 2]])}
    q = {0: torch.tensor([[1, 0], [2, 4], [0, 1], [0, 2]]), 3: torch.tensor([[1, 2], [1, 2], [1, 2], [1, 2]])}
    # layer 0: token 0 swaps slots (no shift), token 1 loses 3, token 2 loses both, token 3 same: 3 of 8
    assert routing_shift(fp, q) == {0: pytest.approx(3 / 8), 3: 0.0}


def test_kd_loss_is_the_full_kl_when_k_covers_the_vocab_and_a_lower_bound_otherwise() -> None:
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 5, 50, generator=g) * 3, torch.randn(2, 5, 50, generator=g) * 3
    full = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()

    def topk(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        v, i = t.topk(k, -1)
        return v - t.logsumexp(-1, keepdim=True), i
    assert float(kd_loss(s, *topk(50))) == pytest.approx(float(full), rel=1e-5)
    for k in (1, 5, 20):
        assert 0 < float(kd_loss(s, *topk(k))) <= float(full) + 1e-6
    assert float(kd_loss(t, *topk(5))) == pytest.approx(0.0, abs=1e-6)


def test_route_loss_is_the_scaled_router_kl() -> None:
    g = torch.Generator().manual_seed(0)
    t = {0: torch.randn(2, 3, 6, generator=g) * 1e-2, 5: torch.randn(2, 3, 6, generator=g) * 1e-2}
    s = {l: [v.reshape(6, 6) + torch.randn(6, 6, generator=g) * 1e-2] for l, v in t.items()}

    def kl(l: int) -> float:
        scale = 0.5 * t[l].reshape(6, 6).std(-1, keepdim=True)
        return float(F.kl_div((s[l][0] / scale).log_softmax(-1), (t[l].reshape(6, 6) / scale).log_softmax(-1),
                              log_target=True, reduction="batchmean"))
    assert float(route_loss(s, t, temperature=0.5)) == pytest.approx(np.mean([kl(0), kl(5)]), rel=1e-5)
    assert float(route_loss(s, t)) > 0.01  # logits 1e-2 apart still give a loss of order 1
    assert float(route_loss(s, {l: v * 100 for l, v in t.items()})) > 0  # scale-free in the teacher's spread
    assert float(route_loss({l: [v.reshape(6, 6) + 3.0] for l, v in t.items()}, t)) == pytest.approx(0.0, abs=1e-6)


def test_split_rows_holds_out_one_in_eight() -> None:
    train, val = split_rows(16, seed=0)
    assert len(val) == 2 and len(train) == 14 and set(train.tolist()) | set(val.tolist()) == set(range(16))
    assert split_rows(16, seed=0)[1].tolist() == val.tolist()


def test_step_budgets() -> None:
    assert step_budgets(2.5, 8.5, 3) == pytest.approx([3.5, 3.0, 2.5])
    assert step_budgets(2.5, 3.0, 2) == pytest.approx([3.0, 2.5])
    assert step_budgets(2.5, 8.5, 1) == [2.5]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model("qwen2_moe", tmp_path_factory.mktemp("rft") / "hf")


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return calibration_tokens(_tokenizer(), None, 512, 64, seed=0)


def _load(path: Path) -> tuple[torch.nn.Module, object]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, adapter_for(model.config.architectures)


def test_quantize_experts_gives_ggml_roundtrip_and_touches_nothing_else(tiny) -> None:
    model, adapter = _load(tiny)
    shape = adapter.moe_shape(model.config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = uniform_plan(list(shape.moe_layers), shape.n_experts, "Q4_K")
    quantize_experts_(model, adapter, plan, None)
    block = adapter.moe_block(model, shape.moe_layers[0])
    w = adapter.experts(block).weights(1)
    fp_gate = before[f"model.layers.{shape.moe_layers[0]}.mlp.experts.gate_up_proj"][1].chunk(2)[0].numpy()
    np.testing.assert_array_equal(w["gate"].detach().numpy(), roundtrip(fp_gate, "Q4_K"))
    for n, p in model.named_parameters():
        if ".experts." not in n:
            assert torch.equal(p, before[n]), n


def test_finetune_changes_only_routers_and_is_reproducible(tiny, tokens) -> None:
    results = []
    for _ in range(2):
        model, adapter = _load(tiny)
        shape = adapter.moe_shape(model.config)
        teacher = teacher_pass(model, adapter, tokens)
        quantize_experts_(model, adapter, uniform_plan(list(shape.moe_layers), shape.n_experts, "Q2_K"), None)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        kd_before = score(model, adapter, tokens, teacher).kd
        history: list[float] = []
        routers = finetune_routers(ModelRunner(model, adapter), tokens, loss="kd", teacher=teacher, lr=1e-3, batch_size=2,
                                   seed=3, progress=False, history=history)
        names = set(router_tensors(model, adapter))
        assert names == set(routers) and any("ffn_gate_inp_shexp" in n for n in names)
        router_ids = {id(p) for p in router_tensors(model, adapter).values()}
        for n, p in model.named_parameters():
            changed = not torch.equal(p, before[n])
            assert changed == (id(p) in router_ids), n
        for n, p in router_tensors(model, adapter).items():
            np.testing.assert_array_equal(p.detach().numpy(), routers[n])
        assert len(history) == 4 and score(model, adapter, tokens, teacher).kd < kd_before
        results.append(routers)
    for n in results[0]:
        np.testing.assert_array_equal(results[0][n], results[1][n])


def test_finetune_ce_needs_no_teacher(tiny, tokens) -> None:
    model, adapter = _load(tiny)
    routers = finetune_routers(ModelRunner(model, adapter), tokens[:2], loss="ce", batch_size=2, progress=False)
    assert all(v.dtype == np.float32 for v in routers.values())
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_route_loss_training_restores_full_precision_routing(tiny, tokens) -> None:
    """Training on the routing-match loss alone moves the quantized model's routing back toward full
    precision: the router KL and the routing shift both fall on the training tokens."""
    model, adapter = _load(tiny)
    shape = adapter.moe_shape(model.config)
    teacher = teacher_pass(model, adapter, tokens)
    assert set(teacher.router_logits) == set(shape.moe_layers)
    quantize_experts_(model, adapter, uniform_plan(list(shape.moe_layers), shape.n_experts, "Q2_K"), None)
    before = score(model, adapter, tokens, teacher)
    assert before.route > 0 and before.mean_shift > 0
    finetune_routers(ModelRunner(model, adapter), tokens, loss="route", teacher=teacher, lr=1e-3, epochs=4, batch_size=2,
                     progress=False)
    after = score(model, adapter, tokens, teacher)
    assert after.route < 0.7 * before.route and after.mean_shift < before.mean_shift


@pytest.mark.parametrize("lr", [1e-3, 1.0])
def test_tune_keeps_the_epoch_with_the_lowest_heldout_kd(tiny, tokens, lr) -> None:
    """select='best' ships the routers of the best held-out epoch; a harmful tuning (lr 1.0) ships none of
    its epochs: the model gets its original routers back."""
    model, adapter = _load(tiny)
    shape = adapter.moe_shape(model.config)
    original = {n: p.detach().clone() for n, p in router_tensors(model, adapter).items()}
    teacher = teacher_pass(model, adapter, tokens)
    quantize_experts_(model, adapter, uniform_plan(list(shape.moe_layers), shape.n_experts, "Q2_K"), None)
    tuned = tune_quantized(ModelRunner(model, adapter), tokens, teacher, TuneOptions(loss="kd", lr=lr, epochs=3), batch_size=2,
                           progress=False)
    report = tuned.report
    curve = report["heldout_kd_per_epoch"]
    assert len(curve) == 4 and report["kept_epoch"] == int(np.argmin(curve))
    assert report["heldout"]["kd_after"] == pytest.approx(min(curve), rel=1e-6)
    assert (tuned.routers is None) == (report["kept_epoch"] == 0) == (not report["routers_shipped"])
    for n, p in router_tensors(model, adapter).items():
        if report["kept_epoch"] == 0:
            assert torch.equal(p, original[n])
        else:
            np.testing.assert_array_equal(p.detach().numpy(), tuned.routers[n])
    if lr == 1.0:
        assert report["kept_epoch"] == 0
