"""The benchmarks' cost problems are the CLI's: same function, same never-routed rule, no pickle."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_model

from gemq_gguf.gemq.budget import Calibration, calib_tokens
from gemq_gguf.gemq.costs import estimate_costs
from gemq_gguf.gemq.stats import collect_stats, load_for_calibration
from gemq_gguf.options import CalibOptions
from gemq_gguf.pipeline import open_source

TYPES = ("Q2_K", "Q4_K", "Q6_K")


@pytest.fixture()
def common(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    import bench._common as common
    return common


def test_bench_tensor_rows_count_never_routed_experts_like_the_cli(tmp_path, monkeypatch, common) -> None:
    path = make_tiny_model("mixtral", tmp_path / "m")
    src = open_source(str(path))
    torch.set_num_threads(1)
    model = load_for_calibration(path, torch.float32)
    calib = CalibOptions(tokens=128, seq_len=64)
    tokens = calib_tokens(path, calib)
    stats = collect_stats(model, src.adapter, tokens)
    layer = src.shape.moe_layers[0]
    stats.layers[layer].counts[2] = 0  # as if calibration never chose expert 2
    c = Calibration(path, model, tokens, stats, stats.imatrix().means())
    monkeypatch.setattr(common, "calibrate", lambda *a, **k: c)
    monkeypatch.setattr(common, "DEFAULT_TYPES", TYPES)  # fewer candidates: a faster test of the same path

    bench = common.Bench(src, tmp_path / "unused.gguf", tmp_path, None)
    bench.prepare_costs(calib.tokens)
    cli = estimate_costs(model, src.adapter, stats, c.imatrix, types=TYPES, granularity="tensor").problem()
    got = bench.problems["tensor"]
    assert got.units == cli.units
    np.testing.assert_array_equal(got.cost, cli.cost)
    np.testing.assert_array_equal(got.bit_matrix, cli.bit_matrix)

    saved = list(tmp_path.glob("costs-*.npz"))
    assert len(saved) == 1 and not list(tmp_path.glob("*.pkl"))
    again = common.Bench(src, tmp_path / "unused.gguf", tmp_path, None)
    monkeypatch.setattr(common, "calibrate", lambda *a, **k: pytest.fail("the saved costs should be reused"))
    again.prepare_costs(calib.tokens)
    for g, p in bench.problems.items():
        q = again.problems[g]
        assert q.units == p.units and q.types == p.types
        np.testing.assert_array_equal(q.cost, p.cost)
        np.testing.assert_array_equal(q.params, p.params)
    assert set(again.imatrix) == set(c.imatrix)
