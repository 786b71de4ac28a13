"""The statistics cache (gemq.cache) on a tiny model: round trips, damaged entries, resumed cost passes."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from gemq_gguf.archs import adapter_for
from gemq_gguf.gemq.cache import StatsCache
from gemq_gguf.gemq.cache_key import checkpoint_fingerprint
from gemq_gguf.gemq.calib import calibration_tokens
from gemq_gguf.gemq.costs import estimate_costs
from gemq_gguf.gemq.stats import collect_stats
from gemq_gguf.options import CalibOptions

TYPES = ("Q2_K", "Q4_K")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """(checkpoint dir, model, adapter, tokens, stats, table without a store, its in-memory quant cache)."""
    path = make_tiny_model("qwen2_moe", tmp_path_factory.mktemp("m"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    adapter = adapter_for(model.config.architectures)
    tokens = calibration_tokens(AutoTokenizer.from_pretrained(path), None, n_tokens=256, seq_len=64)
    stats = collect_stats(model, adapter, tokens)
    quant: dict = {}
    table = estimate_costs(model, adapter, stats, stats.imatrix().means(), types=TYPES, cache=quant)
    return path, model, adapter, tokens, stats, table, quant


def _entry(tmp_path: Path, tiny):
    path, _, _, tokens, _, _, _ = tiny
    return StatsCache(tmp_path).calibration(path, tokens, CalibOptions(), "cpu")


def _costs(tmp_path: Path, tiny, granularity: str = "expert"):
    stats = tiny[4]
    return StatsCache(tmp_path).costs("k", TYPES, granularity, stats.imatrix().means(), "cpu", list(stats.layers))


def test_calibration_round_trip(tmp_path: Path, tiny) -> None:
    stats = tiny[4]
    entry = _entry(tmp_path, tiny)
    assert entry.load() is None
    entry.save(stats)
    got = entry.load()
    assert got is not None and (got.n_seq, got.seq_len, got.loss, got.datasets) == \
        (stats.n_seq, stats.seq_len, stats.loss, stats.datasets)
    for l, s in stats.layers.items():
        for f in ("x", "g", "ids", "weights", "in_sum2", "down_sum2", "counts"):
            a, b = getattr(s, f), getattr(got.layers[l], f)
            assert a.dtype == b.dtype and torch.equal(a, b), f
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_truncated_calibration_is_ignored(tmp_path: Path, tiny, caplog: pytest.LogCaptureFixture) -> None:
    entry = _entry(tmp_path, tiny)
    entry.save(tiny[4])
    f = next(entry.path.glob("*.npz"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="gemq"):
        assert entry.load() is None
    assert "ignoring calibration entry" in caplog.text and not entry.path.exists()


def test_key_sees_weights_and_tokens(tmp_path: Path, tiny) -> None:
    path, _, _, tokens, _, _, _ = tiny
    cache = StatsCache(tmp_path)
    key = cache.calibration(path, tokens, CalibOptions(), "cpu").key
    assert cache.calibration(path, tokens, CalibOptions(), "cpu").key == key
    assert cache.calibration(path, tokens[:, :-1], CalibOptions(), "cpu").key != key
    assert cache.calibration(path, tokens, CalibOptions(seed=1), "cpu").key != key
    assert cache.calibration(path, tokens, CalibOptions(fisher="data"), "cpu").key != key
    assert cache.calibration(path, tokens, CalibOptions(texts=("a.txt",)), "cpu").key != key  # the report names them
    assert cache.calibration(path, tokens, CalibOptions(), "cuda").key != key
    other = make_tiny_model("qwen2_moe", tmp_path / "other", seed=1)  # same layout, other weights
    assert checkpoint_fingerprint(other) != checkpoint_fingerprint(path)


def _table_equal(a, b) -> None:
    assert a.units == b.units and a.types == b.types and a.never_routed == b.never_routed
    np.testing.assert_array_equal(a.cost, b.cost)
    np.testing.assert_array_equal(a.bits, b.bits)
    np.testing.assert_array_equal(a.params, b.params)
    assert all(np.array_equal(a.token_counts[l], b.token_counts[l]) for l in a.token_counts)


def test_interrupted_cost_pass_resumes(tmp_path: Path, tiny, cost_pass) -> None:
    _, model, adapter, _, stats, table, quant = tiny
    means = stats.imatrix().means()
    cost_pass.kill_after = 1
    with pytest.raises(cost_pass.Killed):
        estimate_costs(model, adapter, stats, means, types=TYPES, store=_costs(tmp_path, tiny))
    entry = _costs(tmp_path, tiny)
    assert entry.table(6, stats.projs) is None  # not complete yet

    cost_pass.kill_after = None
    resumed = estimate_costs(model, adapter, stats, means, types=TYPES, store=entry)
    layers = list(stats.layers)
    assert cost_pass.layers == layers  # the first layer once, before the kill; the second after
    _table_equal(resumed, table)
    cached = _costs(tmp_path, tiny).table(6, stats.projs)
    _table_equal(cached, table)
    files = entry.quant_cache()
    assert set(files) == set(quant)
    assert all(np.array_equal(files[k], v) for k, v in quant.items())


def test_corrupt_cost_layer_is_recomputed(tmp_path: Path, tiny, caplog: pytest.LogCaptureFixture) -> None:
    _, model, adapter, _, stats, table, _ = tiny
    means = stats.imatrix().means()
    estimate_costs(model, adapter, stats, means, types=TYPES, store=_costs(tmp_path, tiny))
    entry = _costs(tmp_path, tiny)
    f = entry.path / f"{next(iter(stats.layers))}.npz"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 3] ^= 0xFF  # one flipped byte in the data: the zip CRC catches it
    f.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="gemq"):
        assert entry.table(6, stats.projs) is None
    assert "ignoring cost layer" in caplog.text
    _table_equal(estimate_costs(model, adapter, stats, means, types=TYPES, store=entry), table)


def test_quant_files_mapping(tmp_path: Path, tiny) -> None:
    _, model, adapter, _, stats, _, quant = tiny
    entry = _costs(tmp_path, tiny)
    estimate_costs(model, adapter, stats, stats.imatrix().means(), types=TYPES, store=entry)
    files = entry.quant_cache()
    key = next(iter(quant))
    assert key in files and len(files) == len(quant)
    np.testing.assert_array_equal(files.pop(key), quant[key])
    assert key not in files and len(files) == len(quant) - 1
    files[key] = quant[key]
    assert key in files


def test_cost_key_sees_the_sampled_fraction(tmp_path: Path, tiny) -> None:
    _, model, adapter, _, stats, table, _ = tiny
    means = stats.imatrix().means()
    cache, args = StatsCache(tmp_path), ("k", TYPES, "expert", means, "cpu", list(stats.layers))
    exact = cache.costs(*args)
    assert cache.costs(*args, rows=1.0).path == exact.path
    sampled = cache.costs(*args, rows=0.25)
    assert sampled.path != exact.path and cache.costs(*args, rows=0.125).path != sampled.path
    estimate_costs(model, adapter, stats, means, types=TYPES, store=sampled, rows=0.25)
    assert not any(sampled.path.glob("*.quant.safetensors"))  # partial candidates: the writer quantizes in full
    assert len(sampled.quant_cache()) == 0
    again = cache.costs(*args, rows=0.25).table(6, stats.projs)
    assert again is not None and np.array_equal(again.bits, table.bits) and not np.array_equal(again.cost, table.cost)
