"""GEMQ statistics and costs on tiny random MoE models, in float64 so exactness checks are tight."""
from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import COMMON, CONFIGS, load_tokenizer, make_tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from gemq_gguf.archs import adapter_for, load_text_model
from gemq_gguf.gemq.calib import calibration_tokens
from gemq_gguf.errors import GemqError
from gemq_gguf.gemq.costs import (_fill_never_routed, cost_fraction, estimate_costs, prune_cache, sample_rows,
                                  sample_scale)
from gemq_gguf.gemq.stats import gradient_targets, collect_stats
from gemq_gguf.ggml.names import PROJS, expert_tensor_name
from gemq_gguf.ggml.imatrix import expert_imatrix
from gemq_gguf.ggml.quant import dequantize, quantize
from gemq_gguf.ggml.types import type_info

TYPES = ("Q2_K", "Q4_K", "Q6_K")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(path: Path) -> torch.nn.Module:
    # eager experts: transformers' grouped_mm kernels take no float64
    return load_text_model(path, dtype=torch.float64, experts_implementation="eager").eval()


def _tokens(path: Path, n_seq: int = 4, seq_len: int = 64, seed: int = 0) -> torch.Tensor:
    return calibration_tokens(load_tokenizer(path), None, n_tokens=n_seq * seq_len, seq_len=seq_len, seed=seed)


@pytest.fixture(scope="module", params=["qwen2_moe", "deepseek_v2"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(model, adapter, stats, expert-granularity table, its quant cache) for an arch with shared experts."""
    path = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    model = _load(path)
    adapter = adapter_for(model.config.architectures)
    stats = collect_stats(model, adapter, _tokens(path), store_dtype=torch.float64)
    cache: dict = {}
    table = estimate_costs(model, adapter, stats, stats.imatrix().means(), types=TYPES, dtype=torch.float64,
                           cache=cache)
    return model, adapter, stats, table, cache


def _block_cost(model, adapter, stats, layer: int, expert: int, wq: dict[str, torch.Tensor]) -> float:
    """The cost by definition: re-run the whole MoE block with the expert's weights replaced."""
    block, s = adapter.moe_block(model, layer), stats.layers[layer]
    x = s.x.reshape(1, -1, s.x.shape[1])
    view = adapter.experts(block)
    orig = {p: w.detach().clone() for p, w in view.weights(expert).items()}
    with torch.no_grad():
        y = block(x)
        view.set_weights(expert, wq)
        y_q = block(x)
        view.set_weights(expert, orig)
    return float(((s.g * (y - y_q).reshape(s.g.shape)) ** 2).sum())


def _dequantized(cache: dict, layer: int, expert: int, proj: str, t: str, width: int) -> torch.Tensor:
    data = cache[(expert_tensor_name(layer, proj), expert, t)]
    return torch.from_numpy(dequantize(data, t, width)).double()


def test_shortcut_equals_block_rerun(tiny) -> None:
    model, adapter, stats, table, cache = tiny
    layer = next(iter(stats.layers))
    width = {p: w.shape[1] for p, w in adapter.experts(adapter.moe_block(model, layer)).weights(0).items()}
    for expert in (0, 3):
        for j, t in enumerate(table.types):
            wq = {p: _dequantized(cache, layer, expert, p, t, width[p]) for p in PROJS}
            want = _block_cost(model, adapter, stats, layer, expert, wq)
            got = table.cost[table.units.index((layer, expert, None)), j]
            assert want > 0 and abs(got - want) <= 1e-5 * want, (expert, t, got, want)


def test_projection_costs_equal_block_rerun(tiny) -> None:
    model, adapter, stats, _, cache = tiny
    layer = next(iter(stats.layers))
    table = estimate_costs(model, adapter, stats, stats.imatrix().means(), types=("Q2_K",),
                           granularity="expert-proj", dtype=torch.float64, cache=cache)
    width = {p: w.shape[1] for p, w in adapter.experts(adapter.moe_block(model, layer)).weights(1).items()}
    for p in PROJS:
        want = _block_cost(model, adapter, stats, layer, 1, {p: _dequantized(cache, layer, 1, p, "Q2_K", width[p])})
        got = table.cost[table.units.index((layer, 1, p)), 0]
        assert abs(got - want) <= 1e-5 * want, (p, got, want)
    tensor = estimate_costs(model, adapter, stats, stats.imatrix().means(), types=("Q2_K",), granularity="tensor",
                            dtype=torch.float64, cache=cache)
    for p in PROJS:
        per_expert = [table.cost[table.units.index((layer, e, p)), 0] for e in range(6)]
        assert tensor.cost[tensor.units.index((layer, None, p)), 0] == pytest.approx(sum(per_expert), rel=1e-12)


def test_costs_fall_with_bits(tiny) -> None:
    _, _, _, table, _ = tiny
    q2, q6 = table.cost[:, table.types.index("Q2_K")], table.cost[:, table.types.index("Q6_K")]
    assert (q6 < q2).mean() >= 0.9
    assert np.median(q2 / q6) > 10


def test_bits_params_and_problem(tiny) -> None:
    model, adapter, stats, table, _ = tiny
    w = adapter.experts(adapter.moe_block(model, next(iter(stats.layers)))).weights(0)
    params = sum(v.numel() for v in w.values())
    assert (table.params == params).all()
    for j, t in enumerate(table.types):
        exact = sum(v.shape[0] * type_info(t).row_bytes(v.shape[1]) * 8 for v in w.values())
        assert (table.bits[:, j] == exact).all()
    problem = table.problem()
    assert problem.n_units == len(stats.layers) * 6 and problem.types == list(TYPES)
    assert table.never_routed == [] and all(c.sum() == stats.n_seq * stats.seq_len * 2 for c in table.token_counts.values())


def test_never_routed_experts_get_the_layers_largest_cost(tiny) -> None:
    model, adapter, stats, table, cache = tiny
    layer = next(iter(stats.layers))
    saved = stats.layers[layer].counts.clone()
    stats.layers[layer].counts[2] = 0  # as if calibration never chose expert 2
    try:
        t2 = estimate_costs(model, adapter, stats, stats.imatrix().means(), types=TYPES, dtype=torch.float64, cache=cache)
    finally:
        stats.layers[layer].counts.copy_(saved)
    rows = [t2.units.index((layer, e, None)) for e in range(6)]
    others = [r for e, r in enumerate(rows) if e != 2]
    assert t2.never_routed == [(layer, 2)] and any("never routed" in n for n in t2.notes)
    np.testing.assert_array_equal(t2.cost[rows[2]], t2.cost[others].max(axis=0))


def test_fill_never_routed_pure() -> None:
    c = np.array([[1.0, 5.0], [0.0, 0.0], [3.0, 2.0]])
    np.testing.assert_array_equal(_fill_never_routed(c, np.array([True, False, True])), [[1, 5], [3, 5], [3, 2]])


def test_deterministic_with_seed(tmp_path: Path) -> None:
    path = make_tiny_model("olmoe", tmp_path / "m")
    model = _load(path)
    adapter = adapter_for(model.config.architectures)
    runs = []
    for _ in range(2):
        stats = collect_stats(model, adapter, _tokens(path, 2, 32, seed=3), store_dtype=torch.float64)
        runs.append((stats, estimate_costs(model, adapter, stats, stats.imatrix().means(), types=("Q4_K",),
                                           dtype=torch.float64)))
    (s1, c1), (s2, c2) = runs
    assert all(s1.layers[l].g.equal(s2.layers[l].g) and s1.layers[l].x.equal(s2.layers[l].x) for l in s1.layers)
    np.testing.assert_array_equal(c1.cost, c2.cost)


@pytest.mark.parametrize("labels", ["data", "sampled"])
def test_gradient_is_the_loss_gradient(tmp_path: Path, labels: str) -> None:
    """Nudging a block's output along v changes the loss by <g, v> (central difference; the model's
    RMSNorms compute in float32, which sets the tolerance). The loss is the CE against the text's next
    tokens (`data`) or against one draw per position from the model's own prediction (`sampled`, drawn
    by the seeded generator in batch order)."""
    path = make_tiny_model("mixtral", tmp_path / "m")
    model = _load(path)
    adapter = adapter_for(model.config.architectures)
    tokens = _tokens(path, 2, 32)
    stats = collect_stats(model, adapter, tokens, batch_size=1, store_dtype=torch.float64, labels=labels, seed=5)
    layer, eps = 1, 1e-3
    v = torch.randn(stats.layers[layer].g.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        targets = torch.cat([gradient_targets(model(input_ids=tokens[i:i + 1], use_cache=False).logits, tokens[i:i + 1],
                                      labels, gen) for i in range(len(tokens))])
    if labels == "sampled":
        assert not torch.equal(targets, tokens[:, 1:])

    def loss(shift: float) -> float:
        h = adapter.moe_block(model, layer).register_forward_hook(lambda m, a, o: o + shift * v.reshape(o.shape))
        try:
            with torch.no_grad():
                logits = model(input_ids=tokens, use_cache=False).logits
        finally:
            h.remove()
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                               reduction="sum")
        return float(ce) / (tokens.shape[1] - 1)
    fd = (loss(eps) - loss(-eps)) / (2 * eps)
    assert fd == pytest.approx(float((stats.layers[layer].g * v).sum()), rel=1e-3)
    assert stats.loss == pytest.approx(loss(0.0) / tokens.shape[0], rel=1e-6)


def test_spill_to_disk_matches_ram(tmp_path: Path) -> None:
    path = make_tiny_model("qwen3_moe", tmp_path / "m")
    model = _load(path)
    adapter = adapter_for(model.config.architectures)
    tokens = _tokens(path, 2, 32)
    ram = collect_stats(model, adapter, tokens)
    disk = collect_stats(model, adapter, tokens, ram_limit=0, work_dir=tmp_path / "work")
    spilled = disk.work_dir
    assert spilled.parent == tmp_path / "work" and (spilled / "x0.bin").exists()
    for l in ram.layers:
        assert ram.layers[l].x.dtype == torch.bfloat16
        assert ram.layers[l].x.equal(disk.layers[l].x) and ram.layers[l].g.equal(disk.layers[l].g)
    del disk
    gc.collect()
    assert not spilled.exists()  # the files go with the statistics


def test_odd_widths_use_llama_fallbacks(tmp_path: Path) -> None:
    """160-wide down rows: K/IQ types fall back per projection for whole experts, are refused per projection."""
    kwargs = {**COMMON, **CONFIGS["qwen3_moe"], "moe_intermediate_size": 160}
    cfg = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64, experts_implementation="eager").eval()
    adapter = adapter_for(["Qwen3MoeForCausalLM"])
    stats = collect_stats(model, adapter, torch.randint(0, 384, (2, 32)), store_dtype=torch.float64)
    types = ("IQ4_XS", "Q4_K", "Q8_0")
    whole = estimate_costs(model, adapter, stats, stats.imatrix().means(), types=types, dtype=torch.float64)
    assert np.isfinite(whole.cost).all()
    q4k = types.index("Q4_K")
    down_q5_0 = 256 * type_info("Q5_0").row_bytes(160) * 8  # Q4_K -> Q5_0 for the down rows
    assert whole.bits[0, q4k] == 2 * 160 * type_info("Q4_K").row_bytes(256) * 8 + down_q5_0
    assert any("Q4_K becomes Q5_0" in n for n in whole.notes)
    proj = estimate_costs(model, adapter, stats, stats.imatrix().means(), types=types, granularity="expert-proj",
                          dtype=torch.float64)
    down = [i for i, u in enumerate(proj.units) if u[2] == "down"]
    assert np.isinf(proj.cost[down][:, :2]).all() and np.isfinite(proj.cost[down][:, 2]).all()
    assert np.isfinite(np.delete(proj.cost, down, axis=0)).all()


def test_no_imatrix_refuses_types_that_need_one(tiny) -> None:
    model, adapter, stats, _, _ = tiny
    table = estimate_costs(model, adapter, stats, None, types=("IQ2_XXS", "Q2_K"), granularity="tensor",
                           dtype=torch.float64)
    assert np.isinf(table.cost[:, 0]).all() and np.isfinite(table.cost[:, 1]).all()


def test_prune_cache_keeps_the_plan(tiny) -> None:
    _, _, stats, _, cache = tiny
    layers = list(stats.layers)
    plan = {(l, p): ["Q4_K"] * 3 + ["Q6_K"] * 3 for l in layers for p in PROJS}
    kept = dict(cache)
    prune_cache(kept, plan)
    assert len(kept) == len(layers) * 3 * 6
    assert all(t == ("Q4_K" if e < 3 else "Q6_K") for (_, e, t) in kept)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v2"])
def test_cached_experts_are_the_writers_bytes(arch: str, tmp_path: Path) -> None:
    """The QuantCache filled during cost estimation (from HF weights) holds exactly the bytes the writer
    would make from the float GGUF: a file written with the cache is byte-identical to one without."""
    from gemq_gguf import runtime
    from gemq_gguf.convert.hf_to_gguf import hf_to_float_gguf
    from gemq_gguf.convert.writer import write_gguf
    from gemq_gguf.errors import GemqError
    from gemq_gguf.policy import TensorPolicy
    try:
        runtime.converter_dir()
    except GemqError:
        pytest.skip("llama.cpp's converter is not installed")
    path = make_tiny_model(arch, tmp_path / "hf")
    f32 = hf_to_float_gguf(path, tmp_path / "f32.gguf")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    adapter = adapter_for(model.config.architectures)
    stats = collect_stats(model, adapter, _tokens(path, 2, 32), store_dtype=torch.float32)
    means = stats.imatrix().means()
    cache: dict = {}
    estimate_costs(model, adapter, stats, means, types=("IQ3_XXS", "Q4_K"), cache=cache)
    plan = {(l, p): ["IQ3_XXS", "Q4_K"] * 3 for l in stats.layers for p in PROJS}
    prune_cache(cache, plan)
    with_cache = write_gguf(f32, tmp_path / "a.gguf", plan, TensorPolicy(), imatrix=means, quant_cache=cache,
                            progress=False)
    assert not cache  # the writer used every cached matrix
    write_gguf(f32, tmp_path / "b.gguf", plan, TensorPolicy(), imatrix=means, progress=False)
    assert with_cache.grouped > 0
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_table_feeds_the_allocator(tiny) -> None:
    """The cost table is an AllocationProblem as is: GEMQ spends bits where the costs say, within budget."""
    from gemq_gguf.allocate import solve
    _, _, _, table, _ = tiny
    problem = table.problem()
    gemq, uniform = solve("gemq", problem, 4.5), solve("uniform", problem, 4.5)
    for alloc in (gemq, uniform):
        assert alloc.unit_bits.sum() <= 4.5 * table.params.sum() + 1e-6
    assert gemq.unit_cost.sum() <= uniform.unit_cost.sum()


def test_sampled_costs_are_the_sampled_rows_exact_cost_scaled(tiny) -> None:
    """--cost-rows: each candidate quantizes only sampled rows (ggml's rows are independent: the same bytes as
    those rows of the whole matrix), and the cost is the block's exact cost with only those rows quantized,
    times rows / sampled (for down: the exact per-row costs of the sampled rows, summed and scaled)."""
    model, adapter, stats, _, cache = tiny
    layer, expert, frac = next(iter(stats.layers)), 1, 0.5
    table = estimate_costs(model, adapter, stats, stats.imatrix().means(), types=("Q2_K",), granularity="expert-proj",
                           dtype=torch.float64, cache={}, rows=frac)
    weights = adapter.experts(adapter.moe_block(model, layer)).weights(expert)
    imat = stats.imatrix().means()
    for p in PROJS:
        w = weights[p].detach().to(torch.float32).numpy()
        idx = sample_rows(w.shape[0], frac, layer, expert, p)
        assert idx is not None and len(idx) == round(frac * w.shape[0])
        im = expert_imatrix(imat, layer, p, 6)[expert]
        full = quantize(w, "Q2_K", im, 1)
        assert np.array_equal(quantize(np.ascontiguousarray(w[idx]), "Q2_K", im, 1), full[idx])
        wq = weights[p].detach().clone().double()
        wq[torch.from_numpy(idx)] = torch.from_numpy(dequantize(full, "Q2_K", w.shape[1])).double()[torch.from_numpy(idx)]
        want = w.shape[0] / len(idx) * _block_cost(model, adapter, stats, layer, expert, {p: wq})
        got = table.cost[table.units.index((layer, expert, p)), 0]
        assert want > 0 and got == pytest.approx(want, rel=1e-5), (p, got, want)


def test_sampled_whole_expert_cost_is_the_block_rerun_with_the_sampled_rows(tiny) -> None:
    """Expert granularity at --cost-rows 0.25: gate, up and down each with their sampled rows quantized (the
    arithmetic then runs on those rows and channels only, `patched_delta`), against re-running the block."""
    model, adapter, stats, _, _ = tiny
    layer, frac = next(iter(stats.layers)), 0.25
    imat = stats.imatrix().means()
    table = estimate_costs(model, adapter, stats, imat, types=("Q2_K", "Q4_K"), dtype=torch.float64, cache={}, rows=frac)
    for expert in (0, 2):
        weights = adapter.experts(adapter.moe_block(model, layer)).weights(expert)
        for j, t in enumerate(table.types):
            wq = {}
            for p in PROJS:
                w = weights[p].detach().to(torch.float32).numpy()
                idx = torch.from_numpy(sample_rows(w.shape[0], frac, layer, expert, p))
                full = quantize(w, t, expert_imatrix(imat, layer, p, 6)[expert], 1)
                wq[p] = weights[p].detach().clone().double()
                wq[p][idx] = torch.from_numpy(dequantize(full, t, w.shape[1])).double()[idx]
            want = 4 * _block_cost(model, adapter, stats, layer, expert, wq)  # all three matrices sampled at 1/4
            got = table.cost[table.units.index((layer, expert, None)), j]
            assert want > 0 and got == pytest.approx(want, rel=1e-5), (expert, t, got, want)


def test_sample_rows_and_scale() -> None:
    assert sample_rows(100, 1.0, 0, 0, "up") is None
    a = sample_rows(768, 0.125, 3, 5, "down")
    assert len(a) == 96 and np.array_equal(a, np.unique(a)) and np.array_equal(a, sample_rows(768, 0.125, 3, 5, "down"))
    assert not np.array_equal(a, sample_rows(768, 0.125, 3, 6, "down"))
    assert np.array_equal(sample_rows(768, 0.125, 3, 5, "gate"), sample_rows(768, 0.125, 3, 5, "up"))  # channels
    assert not np.array_equal(a, sample_rows(768, 0.125, 3, 5, "gate"))
    assert sample_scale([(768, 2048), (2048, 768)], [np.arange(96), np.arange(256)]) == pytest.approx(8.0)
    assert sample_scale([(10, 4), (10, 4)], [None, np.arange(5)]) == pytest.approx(1.5)


def test_sampled_costs_keep_no_partial_matrices(tiny) -> None:
    model, adapter, stats, table, _ = tiny
    quant: dict = {}
    sampled = estimate_costs(model, adapter, stats, stats.imatrix().means(), types=TYPES, dtype=torch.float64,
                             cache=quant, rows=0.5)
    assert not quant and np.array_equal(sampled.bits, table.bits) and sampled.units == table.units
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(GemqError, match="cost-rows"):
            estimate_costs(model, adapter, stats, None, types=TYPES, rows=bad)


def test_cost_rows_auto_samples_only_real_size_experts() -> None:
    """`--cost-rows auto`: AUTO_COST_ROWS when every expert matrix has AUTO_COST_ROWS_MIN rows, else exact; a
    given fraction is kept as asked; the CLI reads `auto` and fractions."""
    from gemq_gguf.archs import MoeShape
    from gemq_gguf.cli import build_parser
    from gemq_gguf.gemq.budget import cost_rows
    from gemq_gguf.options import AUTO_COST_ROWS, AUTO_COST_ROWS_MIN, AllocOptions

    assert AllocOptions(budget=3.0).cost_rows is None and 0 < AUTO_COST_ROWS < 1
    assert cost_fraction(None, [768, 768, 2048]) == AUTO_COST_ROWS  # Qwen3-30B-A3B's experts
    assert cost_fraction(None, [AUTO_COST_ROWS_MIN - 1, 4096]) == 1.0
    assert cost_fraction(None, [AUTO_COST_ROWS_MIN, AUTO_COST_ROWS_MIN]) == AUTO_COST_ROWS
    assert cost_fraction(0.25, [64, 64]) == 0.25 and cost_fraction(1.0, [4096]) == 1.0

    def shape(hidden: int, ffn: int) -> MoeShape:
        return MoeShape(n_layers=1, moe_layers=(0,), n_experts=4, top_k=2, hidden=hidden, expert_ffn=ffn, projs=PROJS)
    assert cost_rows(None, shape(2048, 768)) == AUTO_COST_ROWS
    assert cost_rows(None, shape(576, 256)) == 1.0 and cost_rows(None, shape(256, 2048)) == 1.0
    def parse(*args: str) -> float | None:
        return build_parser().parse_args(["m", "-o", "o.gguf", "--budget", "3", *args]).cost_rows
    assert parse() is None and parse("--cost-rows", "auto") is None and parse("--cost-rows", "0.125") == 0.125
    with pytest.raises(SystemExit):
        parse("--cost-rows", "most")
