"""`--budget` end to end on a tiny model: allocation report, heatmap and the written file agree."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGUFReader

from gemq_gguf.cli import main as convert_main
from gemq_gguf.ggml.types import type_info

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(qwen2_moe_dir: Path) -> Path:
    return qwen2_moe_dir


@pytest.mark.parametrize("granularity", ["expert", "tensor"])
def test_budget_run_matches_its_report(model, tmp_path, granularity) -> None:
    out = tmp_path / "g.gguf"
    assert convert_main([str(model), "--budget", "3.0", "--granularity", granularity, "-o", str(out),
                         "--calib-tokens", "2048", "--seq-len", "128"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    alloc = report["allocation"]
    assert alloc["bpw"] <= 3.0 + 1e-9 and alloc["bpw"] > 2.5
    assert alloc["predicted_loss_increase"] == pytest.approx(sum(u["cost"] for u in alloc["units"]))
    # the bits the solver counted are the bits in the file
    expert_bits = sum(8 * t.n_bytes for t in GGUFReader(out).tensors if "_exps" in t.name and t.name.endswith(".weight"))
    assert expert_bits == pytest.approx(alloc["bits_used"], rel=1e-12)
    assert report["file"]["expert_bpw"] == pytest.approx(alloc["bpw"], rel=1e-9)
    assert Path(alloc["heatmap"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = [t.name for t in GGUFReader(out).tensors]
    if granularity == "tensor":
        assert not any(n.endswith(".qmap") for n in names)  # stock-loadable
    types = {u["type"] for u in alloc["units"]}
    assert all(type_info(t).bpw < 8 for t in types)
