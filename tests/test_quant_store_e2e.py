"""The store of what the writer quantized (gemq.quant_store): with sampled costs (no whole candidates), a
second `--budget` on a cached model quantizes only the expert matrices no earlier run wrote, and its file
is the `--no-cache` file byte for byte; a damaged store file is dropped; `--no-cache` writes nothing."""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
from cached_runs import cached_run, uncached_run

from gemq_gguf.convert import writer

pytestmark = pytest.mark.slow
# sampled costs: the cost pass leaves no whole candidate bytes, so the store is what the writer reuses
ARGS = ("--calib-tokens", "512", "--seq-len", "64", "--types", "Q2_K,Q3_K,Q4_K,Q6_K", "--cost-rows", "0.5",
        "--no-verify")


class WriterSpy:
    """Counts ggml quantize calls of the writer, and the expert matrices it asks for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls, self.keys, lock = 0, set(), threading.Lock()
        real_quantize, real_bytes = writer.quantize, writer._Planner._group_bytes

        def quantize(*a, **k):
            with lock:  # the writer quantizes experts in threads
                self.calls += 1
            return real_quantize(*a, **k)

        def group_bytes(planner, name, data, members, t):
            self.keys.update((name, e, t) for e in members)
            return real_bytes(planner, name, data, members, t)
        monkeypatch.setattr(writer, "quantize", quantize)
        monkeypatch.setattr(writer._Planner, "_group_bytes", group_bytes)

    def reset(self) -> tuple[int, set]:
        got = self.calls, self.keys
        self.calls, self.keys = 0, set()
        return got


@pytest.fixture(scope="module")
def model(qwen2_moe_dir: Path) -> Path:
    return qwen2_moe_dir


@pytest.fixture(scope="module")
def uncached(model: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The file of `--budget 3.5 --no-cache`: what a cached run must reproduce byte for byte."""
    return uncached_run(model, tmp_path_factory.mktemp("ref") / "ref.gguf", ARGS)


def _run(model: Path, out: Path, cache: Path, budget_bpw: str, *extra: str) -> bytes:
    return cached_run(model, out, cache, budget_bpw, ARGS, *extra)


def test_second_budget_quantizes_only_new_matrices(model, uncached, tmp_path, monkeypatch) -> None:
    cache, spy = tmp_path / "cache", WriterSpy(monkeypatch)
    _run(model, tmp_path / "a.gguf", cache, "3.0")
    calls_a, keys_a = spy.reset()
    assert json.loads((tmp_path / "a.json").read_text())["file"]["expert_matrices"] == \
        {"from_cache": 0, "quantized": len(keys_a)}
    assert not any(cache.glob("costs-*/*.quant.safetensors")) and any(cache.glob("quant-*/*.safetensors"))
    assert _run(model, tmp_path / "b.gguf", cache, "3.5") == uncached
    calls_b, keys_b = spy.reset()
    new, kept = keys_b - keys_a, keys_b & keys_a
    assert new and kept  # the two budgets share some matrices and differ in others
    assert calls_b - len(new) == calls_a - len(keys_a)  # the non-expert tensors, quantized by both runs
    assert json.loads((tmp_path / "b.json").read_text())["file"]["expert_matrices"] == \
        {"from_cache": len(kept), "quantized": len(new)}
    _run(model, tmp_path / "c.gguf", cache, "3.5", "--granularity", "expert-proj")  # another key of the costs
    calls_c, keys_c = spy.reset()
    assert calls_c - len(keys_c - keys_a - keys_b) == calls_a - len(keys_a)


def test_damaged_store_file_is_dropped(model, uncached, tmp_path, caplog) -> None:
    cache = tmp_path / "cache"
    _run(model, tmp_path / "a.gguf", cache, "3.5")
    f = next(cache.glob("quant-*/*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="gemq"):
        assert _run(model, tmp_path / "b.gguf", cache, "3.5") == uncached
    assert "ignoring quantized experts" in caplog.text and not f.exists()
    got = json.loads((tmp_path / "b.json").read_text())["file"]["expert_matrices"]
    assert got["quantized"] > 0 and got["from_cache"] > 0  # the damaged layer again, the other from the store


def test_no_cache_writes_no_store(model, uncached, tmp_path) -> None:
    fresh = tmp_path / "fresh"
    assert _run(model, tmp_path / "a.gguf", fresh, "3.5", "--no-cache") == uncached
    assert not fresh.exists()
    assert "expert_matrices" not in json.loads((tmp_path / "a.json").read_text())["file"]
