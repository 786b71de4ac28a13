"""`--target-size` / `--target-bpw` and whole-file plans end to end on a tiny model: the file never exceeds
its target, the size bound holds on real files, and a whole-file report replays as a plan (real costs:
calibration, expert and non-expert cost tables, joint ILP)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGUFReader

from gemq_gguf.cli import main as convert_main
from gemq_gguf.convert.file_size import plan_size_bound
from gemq_gguf.ggml.types import fitting_type
from gemq_gguf.plan import load_plan
from gemq_gguf.policy import TensorPolicy

pytestmark = pytest.mark.slow
CALIB = ["--calib-tokens", "1024", "--seq-len", "128", "--no-verify"]


@pytest.fixture(scope="module")
def model(qwen2_moe_dir: Path) -> Path:
    return qwen2_moe_dir


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def test_plan_with_tensor_types_and_size_bound(model, tmp_path) -> None:
    """A --plan with mixed expert types and mixed non-expert types: the writer follows it, and the size
    bound the allocation uses is above the real file by a little."""
    plan = {"units": [{"layer": l, "expert": None, "proj": None, "type": "Q4_K"} for l in (0, 1)]
            + [{"layer": 0, "expert": e, "proj": "down", "type": t} for e, t in enumerate(["Q2_K", "Q6_K", "Q8_0"])],
            "tensors": [{"name": "blk.0.attn_q.weight", "type": "Q8_0"}, {"name": "output.weight", "type": "Q3_K"},
                        {"name": "blk.1.ffn_down_shexp.weight", "type": "Q2_K"}]}
    pf = tmp_path / "plan.json"
    pf.write_text(json.dumps(plan))
    out = tmp_path / "p.gguf"
    assert convert_main([str(model), "--plan", str(pf), "-o", str(out), "--no-verify", "--keep-intermediate"]) == 0
    types = _types(out)
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["output.weight"] == "Q3_K"
    assert types["blk.1.ffn_down_shexp.weight"] == "Q2_K" and types["blk.1.attn_q.weight"] == "Q6_K"  # policy
    report = json.loads(out.with_suffix(".json").read_text())
    assert {r["name"]: r["type"] for r in report["tensors"]} == {r["name"]: r["type"] for r in plan["tensors"]}
    float_gguf = Path(report["intermediate"])
    reader = GGUFReader(float_gguf)
    layers, n = [0, 1], 6
    bound = plan_size_bound(reader, load_plan(pf, layers, n), TensorPolicy(),
                            {r["name"]: r["type"] for r in plan["tensors"]})
    real = out.stat().st_size
    print(f"size bound {bound} bytes, real {real} bytes, slack {bound - real} bytes")
    assert real <= bound <= real + 8192


def test_target_size_is_never_exceeded_and_replays(model, tmp_path) -> None:
    out = tmp_path / "s.gguf"
    target = 2_000_000  # feasible: about 1.0-3.4 MB
    imat = tmp_path / "imatrix.gguf"
    assert convert_main([str(model), "--target-size", str(target), "-o", str(out), "--save-imatrix", str(imat),
                         *CALIB]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    real = out.stat().st_size
    wf = report["whole_file"]
    print(f"target {target} bytes, file {real} bytes, slack {target - real}, bound {wf['bound_bytes']}")
    assert real <= target and wf["file_bytes"] == real and wf["slack_bytes"] == target - real
    assert real <= wf["bound_bytes"] <= target
    assert report["non_expert"]["tensors"] and report["tensors"]
    types = _types(out)
    for r in report["non_expert"]["tensors"]:
        assert types[r["name"]] == fitting_type(r["type"], 256) or types[r["name"]] == r["type"]
    assert Path(report["allocation"]["heatmap"]).read_bytes()[:4] == b"\x89PNG"
    # the report replays as a plan (with the run's imatrix): the same types, the same bytes
    again = tmp_path / "r.gguf"
    assert convert_main([str(model), "--plan", str(out.with_suffix(".json")), "--imatrix", str(imat), "-o", str(again),
                         "--no-verify"]) == 0
    assert _types(again) == types and again.read_bytes()[-200000:] == out.read_bytes()[-200000:]


def test_target_bpw_is_llama_cpp_bpw(model, tmp_path) -> None:
    out = tmp_path / "b.gguf"
    assert convert_main([str(model), "--target-bpw", "5.0", "-o", str(out), *CALIB]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    r = GGUFReader(out)
    data = sum(int(t.n_bytes) for t in r.tensors if not t.name.endswith(".qmap"))
    weights = sum(int(t.n_elements) for t in r.tensors if not t.name.endswith(".qmap"))
    bpw = 8 * data / weights
    print(f"target 5.0 bpw, file {bpw:.5f} bpw")
    assert bpw <= 5.0 and bpw > 4.5 and report["file"]["file_bpw"] == pytest.approx(bpw)
