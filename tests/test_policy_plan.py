"""Non-expert tensor policy and expert plans: pure logic, no model needed."""
from __future__ import annotations

import json

import pytest

from gemq_gguf.errors import GemqError
from gemq_gguf.ggml.names import tensor_category
from gemq_gguf.plan import load_plan, plan_from_units, plan_units, uniform_plan
from gemq_gguf.policy import TensorPolicy


@pytest.mark.parametrize("name,dims,cat", [
    ("token_embd.weight", 2, "embd"), ("output.weight", 2, "output"), ("output_norm.weight", 1, "f32"),
    ("blk.0.attn_q.weight", 2, "attn"), ("blk.3.ffn_down_exps.weight", 3, "expert"),
    ("blk.3.ffn_gate_inp.weight", 2, "router"), ("blk.3.ffn_gate_inp_shexp.weight", 2, "router"),
    ("blk.1.ffn_up_shexp.weight", 2, "shexp"), ("blk.0.ffn_down.weight", 2, "ffn"),
    ("blk.0.attn_q.bias", 1, "f32"), ("blk.0.exp_probs_b.bias", 1, "f32"),
])
def test_category(name: str, dims: int, cat: str) -> None:
    assert tensor_category(name, dims) == cat


def test_policy_defaults_and_overrides() -> None:
    p = TensorPolicy.from_args(["attn=Q8_0", r"blk\.0\.ffn_down=Q4_K"])
    assert p.type_for("blk.1.attn_k.weight", 2) == "Q8_0"
    assert p.type_for("blk.0.ffn_down.weight", 2) == "Q4_K"
    assert p.type_for("blk.1.ffn_down.weight", 2) == "Q6_K"
    assert p.type_for("blk.1.ffn_gate_inp.weight", 2) == "F32"
    q = TensorPolicy.from_args([], non_expert="F32")
    assert q.type_for("token_embd.weight", 2) == "F32" and q.type_for("blk.0.ffn_gate_inp.weight", 2) == "F32"


@pytest.mark.parametrize("spec", ["attn", "attn=NOPE", "(=Q4_K", "expert=Q4_K"])
def test_policy_bad_specs(spec: str) -> None:
    with pytest.raises(GemqError):
        TensorPolicy.from_args([spec])


def test_uniform_plan_and_units_roundtrip() -> None:
    plan = uniform_plan([1, 2], 4, "q4_k")
    assert plan[(1, "down")] == ["Q4_K"] * 4
    assert plan_from_units(plan_units(plan), [1, 2], 4) == plan


def test_plan_defaults_then_single_experts() -> None:
    units = [{"layer": 0, "expert": None, "proj": None, "type": "Q2_K"},
             {"layer": 0, "expert": 2, "proj": "down", "type": "Q6_K"}]
    plan = plan_from_units(units, [0], 3)
    assert plan[(0, "down")] == ["Q2_K", "Q2_K", "Q6_K"] and plan[(0, "gate")] == ["Q2_K"] * 3


@pytest.mark.parametrize("units,needle", [
    ([{"layer": 5, "expert": None, "proj": None, "type": "Q4_K"}], "layer 5"),
    ([{"layer": 0, "expert": 9, "proj": None, "type": "Q4_K"}], "expert 9"),
    ([{"layer": 0, "expert": None, "proj": "w9", "type": "Q4_K"}], "projection"),
    ([{"layer": 0, "expert": None, "proj": None, "type": "Q9_K"}], "unknown ggml type"),
    ([{"layer": 0, "expert": 0, "proj": None, "type": "Q4_K"}], "no type"),
    ([{"expert": 0}], "not {layer"),
    (["Q4_K"], "not {layer"),
    ([{"layer": "0", "expert": None, "proj": None, "type": "Q4_K"}], "'layer' is \"0\", not an integer"),
    ([{"layer": True, "expert": None, "proj": None, "type": "Q4_K"}], "'layer' is true"),
    ([{"layer": 0, "expert": 1.5, "proj": None, "type": "Q4_K"}], "'expert' is 1.5"),
    ([{"layer": 0, "expert": None, "proj": 1, "type": "Q4_K"}], "'proj' is 1"),
    ([{"layer": 0, "expert": None, "proj": None, "type": 4}], "'type' is 4"),
    ([{"layer": 0, "expert": 1, "proj": "down", "type": "Q4_K"}, {"layer": 0, "expert": None, "proj": None, "type": "Q2_K"},
      {"layer": 0, "expert": 1, "proj": "down", "type": "Q6_K"}], "units #0 and #2 both set"),
])
def test_plan_errors(units: list, needle: str) -> None:
    with pytest.raises(GemqError, match=needle):
        plan_from_units(units, [0], 3)


def test_load_plan_errors(tmp_path) -> None:
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    with pytest.raises(GemqError, match="cannot read plan"):
        load_plan(bad, [0], 2)
    bad.write_text(json.dumps({"experts": []}))
    with pytest.raises(GemqError, match="no 'units'"):
        load_plan(bad, [0], 2)
