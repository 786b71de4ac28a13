"""Allocation reports: table, JSON (totals match the units), heatmap PNG."""
from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
from rich.console import Console

from gemq_gguf.allocate import AllocationProblem, bpw_of, solve
from gemq_gguf.options import DEFAULT_TYPES
from gemq_gguf.report import (
    allocation_table,
    heatmap_panels,
    heatmap_size,
    layer_rows,
    plot_heatmap,
    print_allocation,
    read_json,
    report_dict,
    write_json,
)
from synthetic import synthetic_problem


@pytest.fixture(scope="module")
def alloc():
    return solve("gemq", synthetic_problem(4, 16, seed=2), 3.0, method="lp-round")


def png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(32)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_layer_rows_add_up(alloc) -> None:
    rows = layer_rows(alloc)
    assert [r.layer for r in rows] == [0, 1, 2, 3]
    assert sum(r.cost for r in rows) == pytest.approx(alloc.total_cost)
    assert sum(r.bits for r in rows) == pytest.approx(alloc.bits_used)
    assert all(sum(r.counts.values()) == 16 for r in rows)
    assert list(rows[0].counts) == sorted(DEFAULT_TYPES, key=lambda t: bpw_of([t])[0])


def test_table_prints_layers_totals_and_extras(alloc) -> None:
    buf = io.StringIO()
    print_allocation(alloc, {"never_routed": [(1, 3)], "file_size_gib": 1.5}, Console(file=buf, width=120))
    out = buf.getvalue()
    assert "all" in out and "bpw" in out and f"{alloc.bpw:.3f}" in out
    assert "never_routed (1): (1, 3)" in out and "file_size_gib: 1.5" in out
    assert allocation_table(alloc).row_count == 5


def test_json_totals_equal_sum_of_units(tmp_path, alloc) -> None:
    extras = {"never_routed": [[1, 3]], "file": {"size_bytes": np.int64(123), "bpw": 4.1}}
    path = write_json(tmp_path / "alloc.json", alloc, extras)
    d = json.loads(path.read_text())
    assert d["predicted_loss_increase"] == pytest.approx(sum(u["cost"] for u in d["units"]), rel=1e-12)
    assert d["bits_used"] == pytest.approx(sum(u["bits"] for u in d["units"]), rel=1e-12)
    assert d["bits_used"] <= d["bits_budget"]
    assert d["budget_bpw"] == 3.0 and d["strategy"] == "gemq"
    assert d["solver"]["method"] == "lp-round" and d["solver"]["seconds"] >= 0
    assert sum(l["predicted_cost"] for l in d["layers"]) == pytest.approx(d["predicted_loss_increase"])
    assert d["never_routed"] == [[1, 3]] and d["file"]["size_bytes"] == 123
    back, raw = read_json(path)
    assert back.total_cost == pytest.approx(alloc.total_cost)
    assert back.plan() == alloc.plan()
    assert raw["granularity"] == "expert"


def test_extras_cannot_overwrite_report_fields(alloc) -> None:
    with pytest.raises(ValueError):
        report_dict(alloc, {"units": []})


def test_heatmap_png_expert(tmp_path, alloc) -> None:
    path = plot_heatmap(alloc, tmp_path / "h.png")
    assert png_size(path) == heatmap_size(alloc)


def test_heatmap_expert_proj_has_one_panel_per_projection(tmp_path) -> None:
    a = solve("uniform", synthetic_problem(3, 6, projs=("gate", "up", "down")), 3.2)
    panels = heatmap_panels(a)
    assert [p[0] for p in panels] == ["gate_proj", "up_proj", "down_proj"]
    assert panels[0][3].shape == (3, 6) and (panels[0][3] >= 0).all()
    path = plot_heatmap(a, tmp_path / "h.png")
    assert png_size(path) == heatmap_size(a)
    assert heatmap_size(a)[1] > heatmap_size(solve("uniform", synthetic_problem(3, 6), 3.2))[1]


def test_heatmap_tensor_granularity(tmp_path) -> None:
    units = [(l, None, p) for l in range(3) for p in ("gate", "up", "down")]
    rng = np.random.default_rng(0)
    cost = rng.uniform(0.5, 1, (9, len(DEFAULT_TYPES))) * 4.0 ** -bpw_of(DEFAULT_TYPES)
    a = solve("gemq", AllocationProblem.build(units, DEFAULT_TYPES, cost, np.full(9, 1e6)), 3.5)
    (title, layers, cols, grid), = heatmap_panels(a)
    assert cols == ["gate", "up", "down"] and grid.shape == (3, 3)
    assert png_size(plot_heatmap(a, tmp_path / "t.png")) == heatmap_size(a)
