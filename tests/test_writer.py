"""The typed writer on a synthetic float GGUF: grouped layout, qmap, stock names, metadata, atomicity."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from gemq_gguf.errors import GemqError
from gemq_gguf.ggml_quant import quantize
from gemq_gguf.plan import uniform_plan
from gemq_gguf.policy import TensorPolicy
from gemq_gguf.writer import write_gguf

E, H, I = 4, 256, 256


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("w") / "src.gguf"
    w = GGUFWriter(path, "mixtral")
    w.add_block_count(1)
    w.add_string("general.name", "synthetic")
    w.add_tensor("token_embd.weight", rng.standard_normal((64, H)).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(H, dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((H, H)).astype(np.float32))
    w.add_tensor("blk.0.ffn_gate_inp.weight", rng.standard_normal((E, H)).astype(np.float32))
    for p, shape in (("gate", (E, I, H)), ("up", (E, I, H)), ("down", (E, H, I))):
        w.add_tensor(f"blk.0.ffn_{p}_exps.weight", rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tensors(path: Path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


def test_mixed_projection_is_grouped(src, tmp_path) -> None:
    plan = uniform_plan([0], E, "Q4_K")
    plan[(0, "down")] = ["Q6_K", "Q2_K", "Q6_K", "Q4_K"]
    out = tmp_path / "o.gguf"
    s = write_gguf(src, out, plan, TensorPolicy(), progress=False)
    t = _tensors(out)
    assert "blk.0.ffn_down_exps.weight" not in t and "blk.0.ffn_gate_exps.weight" in t
    groups = [t[f"blk.0.ffn_down_exps.q{g}.weight"] for g in range(3)]
    assert [g.tensor_type.name for g in groups] == ["Q2_K", "Q4_K", "Q6_K"]  # ascending ggml type id
    qmap = np.asarray(t["blk.0.ffn_down_exps.qmap"].data).reshape(3, E)
    assert qmap.tolist() == [[-1, 0, -1, -1], [-1, -1, -1, 0], [0, -1, 1, -1]]
    assert list(t["blk.0.ffn_down_exps.qmap"].shape) == [E, 3]
    # expert 2 is the second Q6_K member: its bytes are ggml's quantization of that expert alone
    w_down = np.asarray(_tensors(src)["blk.0.ffn_down_exps.weight"].data)
    assert np.array_equal(np.asarray(groups[2].data)[1], quantize(w_down[2], "Q6_K"))
    assert s.grouped == 1 and s.expert_type_counts == {"Q4_K": 9, "Q6_K": 2, "Q2_K": 1}
    assert t["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    assert t["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert t["blk.0.attn_q.weight"].tensor_type.name == "Q6_K"
    r = GGUFReader(out)
    assert int(r.fields["gemq.version"].contents()) == 1 and int(r.fields["gemq.grouped_tensors"].contents()) == 1
    assert r.fields["general.name"].contents() == "synthetic"


def test_uniform_file_has_stock_layout(src, tmp_path) -> None:
    out = tmp_path / "u.gguf"
    s = write_gguf(src, out, uniform_plan([0], E, "Q3_K"), TensorPolicy(), progress=False)
    t = _tensors(out)
    assert {n for n in t if "_exps" in n} == {f"blk.0.ffn_{p}_exps.weight" for p in ("gate", "up", "down")}
    assert s.grouped == 0 and s.expert_bpw == pytest.approx(3.4375)


def test_routers_replace_and_stay_f32(src, tmp_path) -> None:
    new = np.full((E, H), 0.5, dtype=np.float32)
    out = tmp_path / "r.gguf"
    write_gguf(src, out, uniform_plan([0], E, "Q4_K"), TensorPolicy(), routers={"blk.0.ffn_gate_inp.weight": new},
               progress=False)
    r = GGUFReader(out)
    assert np.array_equal(np.asarray(_tensors(out)["blk.0.ffn_gate_inp.weight"].data), new)
    assert bool(r.fields["gemq.routers_tuned"].contents())


def test_failure_leaves_no_file(src, tmp_path) -> None:
    plan = uniform_plan([0], E, "Q4_K")
    plan[(0, "up")] = ["Q4_K"] * (E - 1)  # wrong length
    out = tmp_path / "bad.gguf"
    with pytest.raises(GemqError, match="has 4 experts"):
        write_gguf(src, out, plan, TensorPolicy(), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_strict_plan_rejects_types_the_rows_cannot_take(tmp_path) -> None:
    path = tmp_path / "odd.gguf"
    w = GGUFWriter(path, "mixtral")
    w.add_tensor("blk.0.ffn_down_exps.weight", np.zeros((2, 256, 288), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()  # noqa: E702
    plan = {(0, "down"): ["Q4_K", "Q4_K"]}
    with pytest.raises(GemqError, match="multiple of 256"):
        write_gguf(path, tmp_path / "o.gguf", plan, TensorPolicy(), strict_plan=True, progress=False)
    s = write_gguf(path, tmp_path / "o.gguf", plan, TensorPolicy(), progress=False)  # llama-quantize's fallback
    assert s.expert_type_counts == {"Q5_0": 2} and s.fallbacks
