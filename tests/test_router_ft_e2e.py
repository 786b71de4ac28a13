"""--finetune-routers / --progressive end to end: only the router tensors change, they are the trained
weights, and a fixed seed writes the same bytes twice."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from gemq_gguf.cli import main as convert_main
from gemq_gguf.gemq import router_ft

pytestmark = pytest.mark.slow
ARGS = ["--budget", "3.0", "--calib-tokens", "1024", "--seq-len", "128", "--seed", "1"]


@pytest.fixture(scope="module")
def model(qwen2_moe_dir: Path) -> Path:
    return qwen2_moe_dir


def _convert(model: Path, out: Path, *flags: str) -> Path:
    assert convert_main([str(model), "-o", str(out), *ARGS, *flags]) == 0
    return out


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in GGUFReader(path).tensors}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def plain(model, tmp_path_factory) -> Path:
    return _convert(model, tmp_path_factory.mktemp("plain") / "plain.gguf")


def test_only_routers_change_and_they_are_the_trained_weights(model, plain, tmp_path, monkeypatch) -> None:
    trained: list[dict[str, np.ndarray]] = []
    original = router_ft.finetune_routers
    monkeypatch.setattr(router_ft, "finetune_routers", lambda *a, **k: trained.append(original(*a, **k)) or trained[-1])
    tuned = _convert(model, tmp_path / "tuned.gguf", "--finetune-routers", "--ft-loss", "kd", "--ft-select", "last")
    a, b = _tensors(plain), _tensors(tuned)
    assert a.keys() == b.keys()
    routers = trained[-1]
    assert any(n.endswith("ffn_gate_inp_shexp.weight") for n in routers)
    # the writer renumbers experts group by group: router rows follow (gemq.expert_order, old id per new)
    field = GGUFReader(tuned).fields.get("gemq.expert_order")
    orders = json.loads(field.contents()) if field is not None else {}
    for name in a:
        if name in routers:
            assert b[name].dtype == np.float32
            order = orders.get(name.split(".")[1]) if name.endswith("ffn_gate_inp.weight") else None
            np.testing.assert_array_equal(b[name], routers[name] if order is None else routers[name][order])
            assert not np.array_equal(a[name], b[name]), name
        else:
            assert a[name].tobytes() == b[name].tobytes(), name
    assert GGUFReader(tuned).fields["gemq.routers_tuned"].contents() is True
    report = json.loads(tuned.with_suffix(".json").read_text())["router_tuning"]
    assert report["loss"] == "kd" and report["steps"] > 0 and report["routers_shipped"]
    assert set(report["routing_shift"]["per_layer"]) == {"0", "1"}

    again = _convert(model, tmp_path / "again.gguf", "--finetune-routers", "--ft-loss", "kd", "--ft-select", "last")
    assert _sha(again) == _sha(tuned)


def test_progressive_records_each_step(model, plain, tmp_path) -> None:
    out = _convert(model, tmp_path / "prog.gguf", "--progressive", "2", "--ft-loss", "ce")
    report = json.loads(out.with_suffix(".json").read_text())
    steps = report["progressive"]
    assert [s["budget"] for s in steps] == pytest.approx([4.0, 3.0])
    assert steps[-1]["bpw"] <= 3.0 + 1e-9 and report["allocation"]["bpw"] == pytest.approx(steps[-1]["bpw"])
    assert all("kd_after" in s["heldout"] for s in steps)
    # routers ship (and the file says they are tuned) only when some step's tuning beat the routers it started from
    kept = any(s["routers_kept"] for s in steps)
    a, b = _tensors(plain), _tensors(out)
    assert any(not np.array_equal(a[n], b[n]) for n in a if "ffn_gate_inp" in n) == kept
    assert GGUFReader(out).fields["gemq.routers_tuned"].contents() is kept
