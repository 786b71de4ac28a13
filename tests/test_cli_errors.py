"""Bad input ends with a one-line cause and fix, exit code 2, no traceback and no output file."""
from __future__ import annotations

import json
import os
import re
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
    """Exit code 2, one line of cause and one of fix, and no file or folder left that was not there before."""
    out = tmp / "out.gguf"
    if "-o" not in args:
        args = [*args, "-o", str(out)]
    before = set(tmp.rglob("*"))
    assert convert_main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "fix:" in err and "Traceback" not in err, err
    assert len(re.findall(r"error: [^\n]+\n  fix: [^\n]+\n", err)) == 1, err
    assert needle.lower() in err.lower(), err
    assert set(tmp.rglob("*")) == before, set(tmp.rglob("*")) - before


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


INDEX = "model.safetensors.index.json"


def _shard(d: Path) -> list[str]:
    """Split model.safetensors into two shards and an index, as save_pretrained does for large models."""
    from safetensors.numpy import load_file, save_file
    tensors = load_file(d / "model.safetensors")
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, members in parts.items():
        save_file({n: tensors[n] for n in members}, d / shard, metadata={"format": "pt"})
    (d / "model.safetensors").unlink()
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {n: s for s, ms in parts.items() for n in ms}}))
    return list(parts)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_sharded_checkpoint_missing_a_shard(capsys, tmp_path, model) -> None:
    d = _variant(model, tmp_path)
    (d / _shard(d)[1]).unlink()
    _fails(capsys, tmp_path, [str(d), "--uniform", "Q4_K"], "lacks 1 of the 2 shards")


def test_index_names_a_tensor_its_shard_lacks(capsys, tmp_path, model) -> None:
    d = _variant(model, tmp_path)
    first = _shard(d)[0]
    _edit_json(d / INDEX, lambda i: i["weight_map"].update({"model.layers.0.extra.weight": first}))
    _fails(capsys, tmp_path, [str(d), "--uniform", "Q4_K"], "does not hold it")


@pytest.mark.parametrize("edit,needle", [
    ({"hidden_size": 512}, "config.json implies"),                     # every matrix wider than stored
    ({"intermediate_size": 512}, "routed experts of 512 x 256"),        # experts narrower than the config's
    ({"num_local_experts": 8}, "6 routed experts in the weights, config.json says 8"),
])
def test_config_and_weights_disagree(capsys, tmp_path, model, edit, needle) -> None:
    d = _variant(model, tmp_path, lambda c: c.update(edit))
    _fails(capsys, tmp_path, [str(d), "--uniform", "Q4_K"], needle)


@pytest.mark.parametrize("value,tensor", [(float("nan"), "model.layers.1.block_sparse_moe.experts.3.w2.weight"),
                                          (float("inf"), "model.layers.0.input_layernorm.weight")])
def test_nan_or_inf_in_a_weight(capsys, tmp_path, model, value, tensor) -> None:
    from safetensors.numpy import load_file, save_file
    d = _variant(model, tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors[tensor].reshape(-1)[7] = value
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    _fails(capsys, tmp_path, [str(d), "--uniform", "Q4_K"], "holds 1 NaN/Inf values")


def test_tokenizer_without_merges(capsys, tmp_path, model) -> None:
    d = _variant(model, tmp_path)
    _edit_json(d / "tokenizer.json", lambda t: t["model"].update(merges=[]))
    _fails(capsys, tmp_path, [str(d), "--uniform", "Q4_K"], "without merges")


def _evil_module(d: Path, module: str) -> Path:
    """A checkpoint code file that leaves a marker when it is imported (it must never be)."""
    marker = d.parent / f"{module}-ran"
    (d / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return marker


def test_custom_model_type_needs_the_flag(capsys, tmp_path, model) -> None:
    d = _variant(model, tmp_path, lambda c: c.update(model_type="evilmoe", auto_map={"AutoConfig": "configuration_evil.C"}))
    marker = _evil_module(d, "configuration_evil")
    _fails(capsys, tmp_path, [str(d), "--uniform", "Q4_K"], "--trust-remote-code")
    assert not marker.exists()


def test_tokenizer_code_never_runs_unasked(capsys, tmp_path, model) -> None:
    """llama.cpp's converter loads tokenizers with trust_remote_code=True; without the flag no checkpoint code
    runs: transformers' own tokenizer class is used where it has one."""
    d = _variant(model, tmp_path)
    marker = _evil_module(d, "tokenization_evil")
    _edit_json(d / "tokenizer_config.json", lambda t: t.update(
        tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}))
    out = tmp_path / "out.gguf"
    assert convert_main([str(d), "--uniform", "Q4_K", "-o", str(out)]) == 0, capsys.readouterr().err
    assert out.exists() and not marker.exists()


def test_pickle_checkpoint_is_refused_unread(capsys, tmp_path, model, monkeypatch) -> None:
    import pickle

    import torch
    d = _variant(model, tmp_path, drop=("model.safetensors",))
    (d / "pytorch_model.bin").write_bytes(b"a pickle that must never be loaded")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    _fails(capsys, tmp_path, [str(d), "--uniform", "Q4_K"], "never loaded")


@pytest.mark.parametrize("damage,needle", [("garbage", "not a GGUF imatrix"), ("truncated", "truncated or damaged")])
def test_malformed_imatrix(capsys, tmp_path, model, damage, needle) -> None:
    import numpy as np

    from gemq_gguf.ggml.imatrix import Imatrix, write_imatrix
    f = tmp_path / "imatrix.gguf"
    name = "blk.0.ffn_down_exps.weight"
    write_imatrix(f, Imatrix({name: np.ones((6, 256), np.float32)}, {name: np.ones(6, np.float32)}, ["x"], 1, 64))
    f.write_bytes(b"not an imatrix" * 50 if damage == "garbage" else f.read_bytes()[:-100])
    _fails(capsys, tmp_path, [str(model), "--uniform", "Q4_K", "--imatrix", str(f)], needle)


@pytest.mark.parametrize("units,needle", [
    ([{"layer": "0", "expert": None, "proj": None, "type": "Q4_K"}], "not an integer"),
    ([{"layer": l, "expert": None, "proj": None, "type": "Q4_K"} for l in (0, 1, 1)], "both set"),
])
def test_plan_wrong_types_or_duplicate_units(capsys, tmp_path, model, units, needle) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"units": units}))
    _fails(capsys, tmp_path, [str(model), "--plan", str(plan)], needle)


def test_work_dir_not_usable(capsys, tmp_path, model) -> None:
    _fails(capsys, tmp_path, [str(model), "--uniform", "Q4_K", "--work-dir", str(tmp_path / "nope")], "work dir")
    (tmp_path / "a-file").write_text("")
    _fails(capsys, tmp_path, [str(model), "--uniform", "Q4_K", "--work-dir", str(tmp_path / "a-file")], "work dir")


def _enospc(path) -> OSError:
    import errno
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def test_disk_full_in_stage_1(capsys, tmp_path, model, monkeypatch) -> None:
    import gemq_gguf.pipeline as pipeline

    def full(model_dir, out, *a, **k):
        out.write_bytes(b"GGUF partial")
        raise _enospc(out)
    monkeypatch.setattr(pipeline, "hf_to_float_gguf", full)
    _fails(capsys, tmp_path, [str(model), "--uniform", "Q4_K"], "no space left")


def test_disk_full_while_writing(capsys, tmp_path, model, monkeypatch) -> None:
    from gguf import GGUFWriter
    original, calls = GGUFWriter.write_tensor_data, []

    def write_then_fill(self, *a, **k):  # the disk fills up after the first tensor
        if calls:
            raise _enospc(self.path)
        calls.append(1)
        return original(self, *a, **k)
    monkeypatch.setattr(GGUFWriter, "write_tensor_data", write_then_fill)
    _fails(capsys, tmp_path, [str(model), "--uniform", "Q4_K"], "no space left")
    assert calls


def test_check_finite_reads_bf16_bits() -> None:
    import numpy as np
    from gguf import GGMLQuantizationType

    from gemq_gguf.convert.hf_to_gguf import check_finite
    from gemq_gguf.errors import GemqError
    bits = (np.array([1.0, np.nan, np.inf, -np.inf, -3.0], np.float32).view(np.uint32) >> 16).astype(np.uint16)
    with pytest.raises(GemqError, match="holds 3 NaN/Inf"):
        check_finite("w", bits, GGMLQuantizationType.BF16)
    check_finite("w", bits[[0, 4]], GGMLQuantizationType.BF16)


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    import subprocess
    d = tmp_path / "tiny-disk"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield d
    subprocess.run(["umount", str(d)], check=True)


def test_disk_check_before_stage_1(capsys, tmp_path, model, tiny_disk, monkeypatch) -> None:
    """The output does not fit a 1 MiB disk: said before stage 1 starts, naming bytes needed and free."""
    import gemq_gguf.pipeline as pipeline

    def stage_1(*a, **k):
        raise AssertionError("stage 1 ran")
    monkeypatch.setattr(pipeline, "hf_to_float_gguf", stage_1)
    work = tmp_path / "work"
    work.mkdir()
    _fails(capsys, tmp_path, [str(model), "--uniform", "Q4_K", "--work-dir", str(work), "-o", str(tiny_disk / "o.gguf")],
           "not enough free disk on " + str(tiny_disk))
    _fails(capsys, tmp_path, [str(model), "--uniform", "Q4_K", "--work-dir", str(tiny_disk)], "float GGUF")


def test_disk_check_counts_each_filesystem(capsys, tmp_path, model, monkeypatch) -> None:
    """Work dir and output on one filesystem: their needs add up (free space monkeypatched)."""
    import gemq_gguf.disk as disk
    from gemq_gguf.convert.checkpoint import float_outtype, load_config
    from gemq_gguf.convert.weights_check import check_safetensors
    tensors = check_safetensors(model)
    gguf = disk.float_gguf_bytes(tensors, float_outtype(load_config(model)), False)
    monkeypatch.setattr(disk, "free_bytes", lambda path: gguf + disk.MARGIN)  # room for the float GGUF only
    _fails(capsys, tmp_path, [str(model), "--uniform", "Q4_K", "--no-verify"], "output (upper bound)")


def test_disk_estimates_bound_the_real_files(tmp_path, model) -> None:
    """The estimates are the real files' tensor bytes (the rest, metadata, is within the margin)."""
    import gemq_gguf.disk as disk
    from gemq_gguf.convert.checkpoint import float_outtype, load_config
    from gemq_gguf.convert.weights_check import check_safetensors
    from gemq_gguf.archs import adapter_for
    out = tmp_path / "o.gguf"
    assert convert_main([str(model), "--uniform", "Q6_K", "--no-verify", "--keep-intermediate", "-o", str(out)]) == 0
    config = load_config(model)
    tensors, outtype = check_safetensors(model), float_outtype(config)
    gguf = disk.float_gguf_bytes(tensors, outtype, False)
    real_gguf = out.with_suffix(f".{outtype}.gguf").stat().st_size
    assert gguf <= real_gguf <= gguf + disk.MARGIN
    bound = disk.output_bound(tensors, adapter_for(config.architectures).moe_shape(config), ["Q6_K"], ["Q6_K"])
    assert bound <= out.stat().st_size <= bound + disk.MARGIN  # Q6_K everywhere: the bound is the tensors' bytes


def test_real_full_disk(capsys, tmp_path, model, tiny_disk, monkeypatch) -> None:
    """The output (1.8 MiB) does not fit: numpy's short write, which has no errno, is reported as a full disk
    (the early disk check is off here: this is what a disk filled by someone else mid-run gives)."""
    import gemq_gguf.pipeline as pipeline
    monkeypatch.setattr(pipeline, "check_disk", lambda needs: None)
    work = tmp_path / "work"
    work.mkdir()
    _fails(capsys, tmp_path, [str(model), "--uniform", "Q4_K", "--work-dir", str(work), "-o", str(tiny_disk / "o.gguf")],
           "no space left")
    assert list(tiny_disk.iterdir()) == []


def test_spilled_statistics_on_a_full_disk_fail_cleanly(tiny_disk) -> None:
    """x/g spill files reserve their blocks up front: ENOSPC (one-line error), never a SIGBUS mid-calibration."""
    import errno

    import torch

    from gemq_gguf.gemq.stats import host_buffer
    with pytest.raises(OSError) as e:
        host_buffer((1024, 1024), torch.float32, tiny_disk / "x0.bin")
    assert e.value.errno == errno.ENOSPC


def test_output_on_a_read_only_disk(capsys, tmp_path, model) -> None:
    """(as root, permissions never refuse a write: a read-only mount does)"""
    import subprocess
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        _fails(capsys, tmp_path, [str(model), "--uniform", "Q4_K", "-o", str(d / "o.gguf")], "cannot write")
        _fails(capsys, tmp_path, [str(model), "--uniform", "Q4_K", "--work-dir", str(d)], "work dir")
    finally:
        subprocess.run(["umount", str(d)], check=True)


@pytest.mark.parametrize("typing", ["uniform", "plan"])
def test_imatrix_reaches_the_writer_for_uniform_and_plan(capsys, tmp_path, model, typing) -> None:
    """--imatrix with --uniform / --plan: the writer gets it, so IQ2_XXS (which needs one) is written.
    (It used to be ignored there, and the run failed after stage 1 asking for --imatrix.)"""
    import numpy as np

    from gemq_gguf.ggml.imatrix import Imatrix, write_imatrix
    from gemq_gguf.ggml.names import expert_tensor_name
    from gemq_gguf.pipeline import open_source
    shape = open_source(str(model)).shape
    width = {"gate": shape.hidden, "up": shape.hidden, "down": shape.expert_ffn}
    names = [(expert_tensor_name(l, p), width[p]) for l in shape.moe_layers for p in shape.projs]
    rng = np.random.default_rng(0)
    imatrix = Imatrix({n: rng.uniform(0.5, 2, (shape.n_experts, w)).astype(np.float32) for n, w in names},
                      {n: np.full(shape.n_experts, 8, np.float32) for n, _ in names}, ["test"], 64, 8)
    f = tmp_path / "imatrix.gguf"
    write_imatrix(f, imatrix)
    if typing == "uniform":
        args = ["--uniform", "IQ2_XXS"]
    else:
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps({"units": [{"layer": l, "expert": None, "proj": None, "type": "IQ2_XXS"}
                                              for l in shape.moe_layers]}))
        args = ["--plan", str(plan)]
    out = tmp_path / "out.gguf"
    assert convert_main([str(model), *args, "--imatrix", str(f), "--no-verify", "-o", str(out)]) == 0, \
        capsys.readouterr().err
    from gguf import GGUFReader
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert all(types[n] == "IQ2_XXS" for n, _ in names)
