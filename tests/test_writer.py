"""The typed writer on a synthetic float GGUF: grouped layout, qmap, expert renumbering, stock names,
metadata, atomicity."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from gemq_gguf.convert.writer import write_gguf
from gemq_gguf.errors import GemqError
from gemq_gguf.ggml.layout import group_major_order
from gemq_gguf.ggml.quant import quantize
from gemq_gguf.plan import uniform_plan
from gemq_gguf.policy import TensorPolicy

E, H, I = 4, 256, 256


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return _make_src(tmp_path_factory.mktemp("w") / "src.gguf")


def _make_src(path: Path, routing_groups: int = 0, merged: bool = False) -> Path:
    rng = np.random.default_rng(0)
    w = GGUFWriter(path, "mixtral")
    w.add_block_count(1)
    if routing_groups:
        w.add_expert_group_count(routing_groups)
    w.add_string("general.name", "synthetic")
    w.add_tensor("token_embd.weight", rng.standard_normal((64, H)).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(H, dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((H, H)).astype(np.float32))
    w.add_tensor("blk.0.ffn_gate_inp.weight", rng.standard_normal((E, H)).astype(np.float32))
    projs = (("gate_up", (E, 2 * I, H)),) if merged else (("gate", (E, I, H)), ("up", (E, I, H)))
    for p, shape in (*projs, ("down", (E, H, I))):
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
    # experts renumbered group by group: new expert i is old expert order[i] (Q2_K: 1, Q4_K: 3, Q6_K: 0, 2)
    order = [1, 3, 0, 2]
    assert json.loads(GGUFReader(out).fields["gemq.expert_order"].contents()) == {"0": order}
    qmap = np.asarray(t["blk.0.ffn_down_exps.qmap"].data).reshape(3, E)
    assert qmap.tolist() == [[0, -1, -1, -1], [-1, 0, -1, -1], [-1, -1, 0, 1]]
    assert list(t["blk.0.ffn_down_exps.qmap"].shape) == [E, 3]
    # old expert 2 is the second Q6_K member: its bytes are ggml's quantization of that expert alone
    s_t = _tensors(src)
    w_down = np.asarray(s_t["blk.0.ffn_down_exps.weight"].data)
    assert np.array_equal(np.asarray(groups[2].data)[1], quantize(w_down[2], "Q6_K"))
    # the router rows and the uniform projections move with their experts
    assert np.array_equal(np.asarray(t["blk.0.ffn_gate_inp.weight"].data), np.asarray(s_t["blk.0.ffn_gate_inp.weight"].data)[order])
    w_gate = np.asarray(s_t["blk.0.ffn_gate_exps.weight"].data)
    assert np.array_equal(np.asarray(t["blk.0.ffn_gate_exps.weight"].data)[1], quantize(w_gate[3], "Q4_K"))
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
    assert "gemq.expert_order" not in GGUFReader(out).fields  # nothing renumbered


def test_renumbering_keeps_routing_groups(tmp_path) -> None:
    src2 = _make_src(tmp_path / "src2.gguf", routing_groups=2)  # experts {0, 1} and {2, 3} route as groups
    plan = uniform_plan([0], E, "Q4_K")
    plan[(0, "down")] = ["Q6_K", "Q2_K", "Q6_K", "Q2_K"]
    out = tmp_path / "g.gguf"
    write_gguf(src2, out, plan, TensorPolicy(), progress=False)
    assert json.loads(GGUFReader(out).fields["gemq.expert_order"].contents()) == {"0": [1, 0, 3, 2]}
    qmap = np.asarray(_tensors(out)["blk.0.ffn_down_exps.qmap"].data).reshape(2, E)
    assert qmap.tolist() == [[0, -1, 1, -1], [-1, 0, -1, 1]]


def test_group_major_order() -> None:
    # a stable sort by type id, first projection first; ties keep the old order
    assert group_major_order([["Q6_K", "Q2_K", "Q6_K", "Q2_K"], ["Q4_K"] * 4]) == [1, 3, 0, 2]
    assert group_major_order([["Q4_K"] * 4, ["Q6_K", "Q2_K", "Q6_K", "Q4_K"]]) == [1, 3, 0, 2]
    assert group_major_order([["Q2_K", "Q2_K", "Q4_K", "Q4_K"], ["Q6_K", "Q2_K", "Q4_K", "Q4_K"]]) == [1, 0, 2, 3]
    # routing groups (DeepSeek n_group): experts never leave their group of E / n_group
    assert group_major_order([["Q6_K", "Q2_K", "Q6_K", "Q2_K"]], n_routing_groups=2) == [1, 0, 3, 2]
    assert group_major_order([["Q4_K"] * 5]) == list(range(5))


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


def test_merged_gate_up_takes_the_gate_type_and_imatrix(tmp_path) -> None:
    """`ffn_gate_up_exps` (Granite-MoE-SWA): quantized with the gate's types and the gate's imatrix (gate and up
    read the same input), exactly as its gate and up rows would be one by one; gate != up types refused."""
    src = _make_src(tmp_path / "merged.gguf", merged=True)
    plan = uniform_plan([0], E, "Q4_K")
    plan[(0, "gate")] = plan[(0, "up")] = ["Q2_K", "Q4_K", "Q2_K", "Q4_K"]
    imat = {"blk.0.ffn_gate_exps.weight": np.random.default_rng(1).uniform(0.1, 2, (E, H)).astype(np.float32)}
    out = tmp_path / "o.gguf"
    write_gguf(src, out, plan, TensorPolicy(), imatrix=imat, progress=False)
    t = _tensors(out)
    w = np.asarray(_tensors(src)["blk.0.ffn_gate_up_exps.weight"].data)
    q = np.asarray(t["blk.0.ffn_gate_up_exps.q0.weight"].data)  # Q2_K: old experts 0 and 2
    assert t["blk.0.ffn_gate_up_exps.q0.weight"].tensor_type.name == "Q2_K"
    assert np.array_equal(q[1], quantize(w[2], "Q2_K", imat["blk.0.ffn_gate_exps.weight"][2]))
    plan[(0, "up")] = ["Q4_K"] * E
    with pytest.raises(GemqError, match="merged"):
        write_gguf(src, tmp_path / "bad.gguf", plan, TensorPolicy(), progress=False)


def test_merged_gate_up_refuses_per_projection_types_early(tmp_path) -> None:
    """`--granularity expert-proj` on such a model fails right after the float GGUF, before calibration."""
    from gemq_gguf.options import AllocOptions
    from gemq_gguf.pipeline import check_merged_gate_up
    merged, split = _make_src(tmp_path / "m.gguf", merged=True), _make_src(tmp_path / "s.gguf")
    with pytest.raises(GemqError, match="gate and up in one tensor"):
        check_merged_gate_up(merged, AllocOptions(budget=4.0, granularity="expert-proj"))
    check_merged_gate_up(merged, AllocOptions(budget=4.0))
    check_merged_gate_up(split, AllocOptions(budget=4.0, granularity="expert-proj"))


def _bf16_src(path: Path, layers: int, bf16: bool) -> Path:
    """A model whose experts are bf16-exact values, stored as BF16 (or as F32, for reference)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize
    rng = np.random.default_rng(1)
    w = GGUFWriter(path, "mixtral")
    w.add_block_count(layers)
    w.add_tensor("token_embd.weight", rng.standard_normal((64, H)).astype(np.float32))
    for l in range(layers):
        w.add_tensor(f"blk.{l}.ffn_gate_inp.weight", rng.standard_normal((E, H)).astype(np.float32))
        for p in ("gate", "up", "down"):
            raw = gguf_quantize(rng.standard_normal((2 * E, I, H)).astype(np.float32), GGMLQuantizationType.BF16)
            if bf16:
                w.add_tensor(f"blk.{l}.ffn_{p}_exps.weight", raw, raw_dtype=GGMLQuantizationType.BF16)
            else:
                f32 = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
                w.add_tensor(f"blk.{l}.ffn_{p}_exps.weight", f32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bf16_source_is_widened_one_expert_at_a_time(tmp_path) -> None:
    """A bf16 model is never widened whole: the writer's allocations stay near one expert's float rows
    (the model's float32 experts are 24x that here), and the file equals the one from float32 values."""
    import tracemalloc
    layers = 4
    plan = uniform_plan(list(range(layers)), 2 * E, "Q4_K")
    ref = tmp_path / "ref.gguf"
    write_gguf(_bf16_src(tmp_path / "f32.gguf", layers, bf16=False), ref, plan, TensorPolicy(), progress=False)
    src = _bf16_src(tmp_path / "bf16.gguf", layers, bf16=True)
    tracemalloc.start()
    try:
        write_gguf(src, tmp_path / "out.gguf", plan, TensorPolicy(), progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    model_f32 = layers * 3 * 2 * E * I * H * 4
    assert peak < model_f32 / 8, f"writer peak {peak:,} bytes for {model_f32:,} bytes of float32 experts"
    assert (tmp_path / "out.gguf").read_bytes() == ref.read_bytes()
