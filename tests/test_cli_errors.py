"""Bad input ends with a one-line cause and fix, exit code 2, no traceback and no output file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny_models import make_tiny_model

from gemq_gguf.cli import main as convert_main


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model("mixtral", tmp_path_factory.mktemp("m") / "hf")


def _variant(model: Path, tmp: Path, config_edit=None, drop: tuple[str, ...] = ()) -> Path:
    d = tmp / "variant"
    shutil.copytree(model, d)
    for name in drop:
        (d / name).unlink()
    if config_edit:
        cfg = json.loads((d / "config.json").read_text())
        config_edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


def _fails(capsys, tmp: Path, args: list[str], needle: str) -> None:
    out = tmp / "out.gguf"
    if "-o" not in args:
        args = [*args, "-o", str(out)]
    assert convert_main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "fix:" in err and "Traceback" not in err, err
    assert needle.lower() in err.lower(), err
    assert not any(p.suffix in (".gguf", ".tmp") for p in tmp.rglob("*") if "variant" not in p.parts), list(tmp.rglob("*"))


def test_missing_model_dir(capsys, tmp_path) -> None:
    _fails(capsys, tmp_path, [str(tmp_path / "nope"), "--uniform", "Q4_K"], "does not exist")


def test_not_a_checkpoint(capsys, tmp_path) -> None:
    _fails(capsys, tmp_path, [str(tmp_path), "--uniform", "Q4_K"], "no config.json")


def test_not_causal_lm(capsys, tmp_path, model) -> None:
    d = _variant(model, tmp_path, lambda c: c.update(architectures=["MixtralModel"]))
    _fails(capsys, tmp_path, [str(d), "--uniform", "Q4_K"], "not a causal language model")


def test_dense_model(capsys, tmp_path, model) -> None:
    d = _variant(model, tmp_path, lambda c: c.update(num_local_experts=1))
    _fails(capsys, tmp_path, [str(d), "--uniform", "Q4_K"], "dense model")


def test_unsupported_moe_architecture(capsys, tmp_path, model) -> None:
    d = _variant(model, tmp_path, lambda c: c.update(architectures=["PhimoeForCausalLM"], model_type="phimoe"))
    _fails(capsys, tmp_path, [str(d), "--uniform", "Q4_K"], "MixtralForCausalLM")
    _fails(capsys, tmp_path, [str(d), "--uniform", "Q4_K"], "sparsemixer")  # the reason, where we know it


def test_missing_tokenizer(capsys, tmp_path, model) -> None:
    d = _variant(model, tmp_path, drop=("tokenizer.json", "tokenizer_config.json"))
    _fails(capsys, tmp_path, [str(d), "--uniform", "Q4_K"], "no tokenizer")


def test_truncated_safetensors(capsys, tmp_path, model) -> None:
    d = _variant(model, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _fails(capsys, tmp_path, [str(d), "--uniform", "Q4_K"], "truncated")


def test_output_not_writable(capsys, tmp_path, model) -> None:
    _fails(capsys, tmp_path, [str(model), "--uniform", "Q4_K", "-o", str(tmp_path / "no" / "such" / "x.gguf")],
           "cannot write")


def test_unknown_type(capsys, tmp_path, model) -> None:
    _fails(capsys, tmp_path, [str(model), "--uniform", "Q3_X"], "unknown ggml type")


def test_no_allocation_choice(capsys, tmp_path, model) -> None:
    _fails(capsys, tmp_path, [str(model)], "exactly one of")


def test_plan_naming_missing_expert(capsys, tmp_path, model) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"units": [{"layer": 0, "expert": 42, "proj": None, "type": "Q4_K"}]}))
    _fails(capsys, tmp_path, [str(model), "--plan", str(plan)], "expert 42")


def test_type_the_shape_cannot_take(capsys, tmp_path) -> None:
    odd = make_tiny_model("mixtral", tmp_path / "odd", intermediate_size=288)  # down rows 288 wide: no K-quants
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"units": [{"layer": l, "expert": None, "proj": None, "type": "Q4_K"} for l in (0, 1)]}))
    _fails(capsys, tmp_path, [str(odd), "--plan", str(plan)], "multiple of 256")


def test_budget_outside_reachable_range(capsys, tmp_path, model) -> None:
    _fails(capsys, tmp_path, [str(model), "--budget", "1.5"], "below the lowest reachable")
    _fails(capsys, tmp_path, [str(model), "--budget", "9", "--types", "Q2_K,Q4_K"], "above")
