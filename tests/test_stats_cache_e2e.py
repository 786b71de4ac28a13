"""A second `--budget` on a cached model: no calibration, no costs, the same bytes as an uncached run;
`--no-cache`, damaged entries and an interrupted cost pass (tiny model, end to end)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from cached_runs import cached_run, uncached_run

from gemq_gguf.gemq import budget

pytestmark = pytest.mark.slow
ARGS = ("--calib-tokens", "512", "--seq-len", "64", "--types", "Q2_K,Q3_K,Q4_K,Q6_K")


@pytest.fixture(scope="module")
def model(qwen2_moe_dir: Path) -> Path:
    return qwen2_moe_dir


@pytest.fixture(scope="module")
def uncached(model: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The file of `--budget 3.5 --no-cache`: what every cached run must reproduce byte for byte."""
    return uncached_run(model, tmp_path_factory.mktemp("ref") / "ref.gguf", ARGS)


def _run(model: Path, out: Path, cache: Path, budget_bpw: str, *extra: str) -> bytes:
    return cached_run(model, out, cache, budget_bpw, ARGS, *extra)


def _forbid_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*a, **k):
        raise AssertionError("the cache should have made this pass unnecessary")
    monkeypatch.setattr(budget, "collect_stats", forbidden)
    monkeypatch.setattr(budget, "estimate_costs", forbidden)
    monkeypatch.setattr(budget, "load_for_calibration", forbidden)


def test_second_budget_hits_the_cache(model, uncached, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    first = _run(model, tmp_path / "a.gguf", cache, "3.0")
    assert first != uncached and any(cache.glob("calib-*")) and any(cache.glob("costs-*"))
    assert json.loads((tmp_path / "a.json").read_text())["allocation"]["cost_rows"] == 1.0  # auto: tiny experts, exact
    _forbid_passes(monkeypatch)
    assert _run(model, tmp_path / "b.gguf", cache, "3.5") == uncached


def test_no_cache_neither_reads_nor_writes(model, uncached, tmp_path, monkeypatch) -> None:
    calls = []
    real = budget.collect_stats
    monkeypatch.setattr(budget, "collect_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = tmp_path / "cache"
    _run(model, tmp_path / "a.gguf", cache, "3.5")
    assert _run(model, tmp_path / "b.gguf", cache, "3.5", "--no-cache") == uncached
    assert len(calls) == 2
    fresh = tmp_path / "fresh"
    _run(model, tmp_path / "c.gguf", fresh, "3.5", "--no-cache")
    assert not fresh.exists()


def test_damaged_entries_are_recomputed(model, uncached, tmp_path, caplog) -> None:
    cache = tmp_path / "cache"
    _run(model, tmp_path / "a.gguf", cache, "3.0")
    for f in [next(cache.glob("calib-*/*.npz")), next(cache.glob("costs-*/*.quant.safetensors"))]:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="gemq"):
        assert _run(model, tmp_path / "b.gguf", cache, "3.5") == uncached
    assert "ignoring calibration entry" in caplog.text and "ignoring cost layer" in caplog.text


def test_killed_cost_pass_resumes(model, uncached, tmp_path, cost_pass) -> None:
    cache = tmp_path / "cache"
    cost_pass.kill_after = 1
    with pytest.raises(cost_pass.Killed):
        _run(model, tmp_path / "a.gguf", cache, "3.5")
    assert not (tmp_path / "a.gguf").exists()
    done = list(cost_pass.layers)
    cost_pass.kill_after, cost_pass.layers = None, []
    assert _run(model, tmp_path / "a.gguf", cache, "3.5") == uncached
    assert cost_pass.layers and done[0] not in cost_pass.layers
