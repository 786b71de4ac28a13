"""The store of the writer's quantized experts (gemq.quant_store) as a mapping, without a model: what it
persists and when, its limit, files it must ignore; and the disk check's count of it."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from gemq_gguf.gemq.quant_store import StoredQuant

NAME = "blk.{}.ffn_down_exps.weight"


def _bytes(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (4, 18), dtype=np.uint8)


def _write(store: StoredQuant, layers: range, types: tuple[str, ...] = ("Q4_0",)) -> dict:
    """What the writer does: look up, quantize when missing, pop; layer after layer."""
    got = {}
    for l in layers:
        for e in range(3):
            for t in types:
                key = (NAME.format(l), e, t)
                if key not in store:
                    store[key] = _bytes(hash(key) % 2**32)
                got[key] = store.pop(key)
    return got


def test_persists_layer_by_layer_and_reuses(tmp_path: Path) -> None:
    first = StoredQuant(tmp_path, "k" * 64, {})
    _write(first, range(1))
    assert not list(tmp_path.glob("quant-*/*"))  # the current layer waits for the next one (or close)
    want = _write(first, range(1, 3))
    assert len(list(tmp_path.glob("quant-*/*.safetensors"))) == 2
    assert first.close() == {"from_cache": 0, "quantized": 9}
    assert len(list(tmp_path.glob("quant-*/*.safetensors"))) == 3 and not list(tmp_path.glob("quant-*/.*"))

    inner = {(NAME.format(0), 0, "Q8_0"): _bytes(7)}  # the cost pass's candidates come first
    second = StoredQuant(tmp_path, "k" * 64, inner)
    got = _write(second, range(3), ("Q4_0", "Q8_0"))
    assert all(np.array_equal(got[k], v) for k, v in want.items())
    assert np.array_equal(got[(NAME.format(0), 0, "Q8_0")], _bytes(7)) and not inner
    assert second.close() == {"from_cache": 10, "quantized": 8}
    assert len(list(tmp_path.glob("quant-*/*.safetensors"))) == 6  # one file per layer and run


def test_other_keys_and_damaged_files_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = StoredQuant(tmp_path, "a" * 64, {})
    _write(a, range(2))
    a.close()
    files = sorted(a.path.glob("*.safetensors"))
    other = a.path.parent / f"quant-{'b' * 32}"  # another key's folder name holding this key's files
    other.mkdir()
    moved = [other / f.name for f in files]
    for f, to in zip(files, moved):
        f.rename(to)
    moved[0].write_bytes(moved[0].read_bytes()[:-7])  # and one of them truncated
    b = StoredQuant(tmp_path, "b" * 64, {})
    with caplog.at_level(logging.WARNING, logger="gemq"):
        _write(b, range(2))
    assert b.close() == {"from_cache": 0, "quantized": 6}
    assert "another key" in caplog.text and caplog.text.count("ignoring quantized experts") == 2
    assert not any(f.exists() for f in moved)


def test_limit_stops_persisting(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    one_layer = 3 * _bytes(0).nbytes
    store = StoredQuant(tmp_path, "k" * 64, {}, limit=one_layer + 1)  # one layer's bytes; the file adds a header
    with caplog.at_level(logging.INFO, logger="gemq"):
        _write(store, range(3))
        store.close()
    assert len(list(store.path.glob("*.safetensors"))) == 1
    assert caplog.text.count("not saving more") == 1


def test_disk_check_counts_the_store(tmp_path: Path) -> None:
    from tiny_models import make_tiny_model

    from gemq_gguf import disk
    from gemq_gguf.convert.checkpoint import inspect_checkpoint
    from gemq_gguf.convert.weights_check import check_safetensors
    model = make_tiny_model("qwen2_moe", tmp_path / "m")
    config, _, shape = inspect_checkpoint(model)
    tensors = check_safetensors(model)
    kw = dict(outtype="f32", tied_output=False, work_dir=tmp_path, output_dir=tmp_path, expert_types=["Q4_K", "Q8_0"],
              other_types=["Q6_K"], calib=None, verify_tokens=0)
    plain = disk.run_needs(model, tensors, config, shape, **kw)
    cached = disk.run_needs(model, tensors, config, shape, cache_dir=tmp_path / "no" / "such" / "dir", **kw)
    extra = [n for n in cached if n not in plain]
    weights = len(shape.moe_layers) * shape.n_experts * len(shape.projs) * shape.hidden * shape.expert_ffn
    experts = weights * 34 // 32  # the widest candidate, Q8_0: 34 bytes per 32 weights
    assert [(n.what, n.path, n.size) for n in extra] == [("statistics cache: quantized experts", tmp_path, experts)]
