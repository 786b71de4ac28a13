"""The whole-file allocation (--target-bpw / --target-size): size parsing, the joint problem on
synthetic non-expert tables, the writer's per-tensor types and size cap, the file-size bound against real
files, plan replay of non-expert types, CLI errors."""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from synthetic import synthetic_problem
from test_writer import E, _make_src

from gemq_gguf.allocate import solve, violations
from gemq_gguf.allocate.joint import FileBits, FileParts, free_bits, is_tensor_unit, joint_problem, tensor_unit
from gemq_gguf.cli import main as convert_main
from gemq_gguf.convert.file_size import plan_size_bound
from gemq_gguf.convert.writer import write_gguf
from gemq_gguf.errors import GemqError
from gemq_gguf.gemq.tensor_costs import TensorCostTable
from gemq_gguf.options import FileTarget, parse_size
from gemq_gguf.plan import load_tensor_types, uniform_plan
from gemq_gguf.policy import TensorPolicy
from gemq_gguf.report import plot_heatmap, report_dict, tensor_section

TTYPES = ["Q4_K", "Q6_K", "Q8_0"]


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("spec,n", [("17.5GiB", 18790481920), ("900MiB", 900 * 2**20), ("900MB", 900 * 10**6),
                                    ("123456789", 123456789), ("1.5 KiB", 1536), ("2gb", 2 * 10**9)])
def test_parse_size(spec: str, n: int) -> None:
    assert parse_size(spec) == n


@pytest.mark.parametrize("spec", ["", "GiB", "12XB", "-5MB", "0", "1e9", "1,000"])
def test_parse_size_rejects(spec: str) -> None:
    with pytest.raises(GemqError, match="size"):
        parse_size(spec)


def test_target_is_bpw_or_size() -> None:
    with pytest.raises(ValueError):
        FileTarget()
    with pytest.raises(ValueError):
        FileTarget(bpw=4.0, size=10)


# ----------------------------------------------------------------------------- the joint problem


def synthetic_tensors(n: int, seed: int, params: int = 256 * 512) -> TensorCostTable:
    """A synthetic non-expert table (same error model as tests/synthetic.py): no model needed."""
    rng = np.random.default_rng(seed)
    from gemq_gguf.allocate import bpw_of
    bpw = bpw_of(TTYPES)
    names = [f"blk.{i // 2}.attn_{'qk'[i % 2]}.weight" for i in range(n - 1)] + ["output.weight"]
    cost = rng.lognormal(0, 1, n)[:, None] * 4.0 ** (-bpw[None, :]) * rng.lognormal(0, 0.15, (n, len(TTYPES))) * 1e-3
    p = np.full(n, params, dtype=np.int64)
    return TensorCostTable(names, list(TTYPES), cost, p[:, None] * bpw[None, :], p, [])


def _joint(n_layers: int, n_experts: int, n_tensors: int, seed: int, types=("Q2_K", "Q4_K", "Q6_K")):
    experts = synthetic_problem(n_layers, n_experts, types=list(types), seed=seed, params_per_unit=3 * 256 * 256)
    t = synthetic_tensors(n_tensors, seed)
    return experts, t, joint_problem(experts, t.names, t.types, t.cost, t.bits, t.params)


def test_joint_problem_layout() -> None:
    experts, t, j = _joint(2, 3, 4, 0)
    p = j.problem
    assert p.types == ["Q2_K", "Q4_K", "Q6_K", "Q8_0"]
    assert p.units[:experts.n_units] == experts.units and j.names == t.names
    assert all(is_tensor_unit(u) for u in p.units[j.n_expert:]) and not any(map(is_tensor_unit, experts.units))
    assert tensor_unit("output.weight") == (-1, None, "output.weight")
    assert tensor_unit("blk.12.attn_q.weight") == (12, None, "blk.12.attn_q.weight")
    assert np.isinf(p.cost[:j.n_expert, 3]).all() and np.isinf(p.cost[j.n_expert:, 0]).all()  # own candidates only
    assert len(p.groups) == len(experts.groups)  # a tensor is no max-types group


def _brute(p, free: float, max_types: int | None) -> float:
    best = np.inf
    for combo in itertools.product(range(p.n_types), repeat=p.n_units):
        c = np.array(combo)
        if p.allowed[np.arange(p.n_units), c].all() and p.bit_matrix[np.arange(p.n_units), c].sum() <= free:
            if not violations(p, c, 1e9, max_types):
                best = min(best, float(p.cost[np.arange(p.n_units), c].sum()))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_joint_ilp_meets_target_and_is_optimal(seed: int) -> None:
    """2 layers x 2 experts + 3 tensors: the ILP's choice fits the bits left by the target exactly
    (never over) and costs what brute force finds."""
    _, t, j = _joint(2, 2, 3, seed)
    p = j.problem
    lo, hi = p.bpw_range()
    target = int((lo + (hi - lo) * np.random.default_rng(seed).uniform(0.2, 0.8)) * p.total_params) + 12345 * 8
    fixed = FileBits(fixed_tensor_bits=12345 * 8, fixed_params=1000)
    free = free_bits(target, fixed, p, "test target")
    a = solve("gemq", p, j.budget_bpw(free), max_types=2, mip_rel_gap=1e-9)
    assert a.bits_used <= free and a.bits_used + fixed.fixed_tensor_bits <= target
    assert a.total_cost == pytest.approx(_brute(p, free, 2), rel=1e-9)


def test_joint_split_gives_expert_allocation_and_tensors(tmp_path) -> None:
    experts, t, j = _joint(3, 4, 5, 1)
    p = j.problem
    free = 0.5 * (p.bpw_range()[0] + p.bpw_range()[1]) * p.total_params
    a = solve("gemq", p, j.budget_bpw(free), max_types=3)
    ea, tc = j.split(a)
    assert ea.units == experts.units and ea.types == experts.types
    assert ea.bits_used + tc.total_bits == pytest.approx(a.bits_used)
    assert ea.total_cost + float(tc.cost.sum()) == pytest.approx(a.total_cost)
    assert set(tc.as_dict()) == set(t.names) and set(tc.types) <= set(TTYPES)
    d = report_dict(ea)
    assert d["granularity"] == "expert" and len(d["units"]) == experts.n_units
    sec = tensor_section(tc)
    assert [r["name"] for r in sec["tensors"]] == t.names and sec["bits"] == pytest.approx(tc.total_bits)
    png = plot_heatmap(ea, tmp_path / "h.png", tensors=tc)
    assert png.stat().st_size > 0


def test_expert_only_problem_unchanged_through_joint() -> None:
    """No non-expert tensor: the joint problem is the expert problem, and so is its answer."""
    experts = synthetic_problem(4, 8, seed=3)
    j = joint_problem(experts, [], [], np.zeros((0, 0)), np.zeros((0, 0)), np.zeros(0))
    budget = 3.2
    a = solve("gemq", experts, budget, max_types=3)
    b = solve("gemq", j.problem, budget, max_types=3)
    assert np.array_equal(a.type_index, b.type_index) and a.total_cost == b.total_cost


def test_infeasible_targets_say_the_range() -> None:
    _, _, j = _joint(2, 2, 3, 0)
    p = j.problem
    fixed = FileBits(8000, 1000, 8 * 4096)
    lo = p.bpw_range()[0] * p.total_params + 8000 + 8 * 4096
    hi = p.bpw_range()[1] * p.total_params + 8000 + 8 * 4096
    for target, word in ((int(lo) - 8, "below the smallest"), (int(hi) + 8, "above the largest")):
        with pytest.raises(GemqError, match=word) as e:
            free_bits(target, fixed, p, "--target-size X")
        assert re.search(r"feasible: [\d,]+-[\d,]+ bytes, [\d.]+-[\d.]+ bpw", e.value.problem), e.value.problem


def test_file_parts_bits() -> None:
    parts = FileParts(policy_bytes={"a": 10, "b": 20, "c": 30}, params={"a": 1, "b": 2, "c": 3}, total_params=100,
                      overhead_bytes=7)
    f = parts.fixed({"b"})
    assert (f.fixed_tensor_bits, f.fixed_params, f.overhead_bits) == (320, 4, 56)
    assert parts.target_bits(FileTarget(size=1000, spec="1000"))[0::2] == (8000, True)
    assert parts.target_bits(FileTarget(bpw=4.5))[0::2] == (450, False)


# ----------------------------------------------------------------------------- writer and file size


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return _make_src(tmp_path_factory.mktemp("wf") / "src.gguf")


def test_writer_honours_tensor_types(src, tmp_path) -> None:
    out = tmp_path / "o.gguf"
    tt = {"blk.0.attn_q.weight": "Q8_0", "token_embd.weight": "Q2_K"}
    write_gguf(src, out, uniform_plan([0], E, "Q4_K"), TensorPolicy(), tensor_types=tt, progress=False)
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q2_K"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"  # untouched: policy


def test_writer_refuses_unknown_tensor_and_oversize(src, tmp_path) -> None:
    out = tmp_path / "o.gguf"
    with pytest.raises(GemqError, match="does not have"):
        write_gguf(src, out, uniform_plan([0], E, "Q4_K"), TensorPolicy(), tensor_types={"nope.weight": "Q4_K"},
                   progress=False)
    size = write_gguf(src, out, uniform_plan([0], E, "Q4_K"), TensorPolicy(), progress=False).file_bytes
    out.unlink()
    with pytest.raises(GemqError, match="over the target"):
        write_gguf(src, out, uniform_plan([0], E, "Q4_K"), TensorPolicy(), max_bytes=size - 1, progress=False)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    write_gguf(src, out, uniform_plan([0], E, "Q4_K"), TensorPolicy(), max_bytes=size, progress=False)
    assert out.stat().st_size == size


@pytest.mark.parametrize("mixed", [False, True])
def test_size_bound_is_above_the_real_file(src, tmp_path, mixed: bool) -> None:
    plan = uniform_plan([0], E, "Q4_K")
    if mixed:
        plan[(0, "down")] = ["Q6_K", "Q2_K", "Q8_0", "Q4_K"]
    tt = {"blk.0.attn_q.weight": "Q8_0", "token_embd.weight": "Q2_K"}
    real = write_gguf(src, tmp_path / "o.gguf", plan, TensorPolicy(), tensor_types=tt, progress=False).file_bytes
    bound = plan_size_bound(GGUFReader(src), plan, TensorPolicy(), tt)
    assert real <= bound <= real + 4096, (real, bound)


def test_load_tensor_types(tmp_path) -> None:
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"units": [], "tensors": [{"name": "output.weight", "type": "q8_0"}]}))
    assert load_tensor_types(p) == {"output.weight": "Q8_0"}
    p.write_text(json.dumps({"units": [], "tensors": [{"name": "output.weight"}]}))
    with pytest.raises(GemqError, match="not {name, type}"):
        load_tensor_types(p)
    p.write_text(json.dumps({"units": [], "tensors": [{"name": "a", "type": "Q4_K"}, {"name": "a", "type": "Q4_K"}]}))
    with pytest.raises(GemqError, match="typed twice"):
        load_tensor_types(p)


# ----------------------------------------------------------------------------- CLI errors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_model
    return make_tiny_model("mixtral", tmp_path_factory.mktemp("m") / "hf")


def _fails(capsys, tmp: Path, args: list[str], needle: str) -> str:
    """Exit code 2, one line of cause and one of fix, nothing left behind."""
    before = set(tmp.rglob("*"))
    assert convert_main([*args, "-o", str(tmp / "out.gguf"), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert len(re.findall(r"error: [^\n]+\n  fix: [^\n]+\n", err)) == 1 and "Traceback" not in err, err
    assert needle.lower() in err.lower(), err
    assert set(tmp.rglob("*")) == before
    return err


@pytest.mark.parametrize("args,needle", [
    (["--target-size", "12XB"], "is not a size"),
    (["--target-size", "1GB", "--budget", "3"], "exactly one of"),
    (["--target-size", "1GB", "--target-bpw", "4"], "exactly one of"),
    (["--target-bpw", "4", "--uniform", "Q4_K"], "exactly one of"),
    (["--target-bpw", "-1"], "not a positive number"),
    (["--target-bpw", "4", "--strategy", "layerwise"], "does not take --target-bpw"),
])
def test_cli_bad_targets(capsys, tmp_path, tiny, args, needle) -> None:
    _fails(capsys, tmp_path, [str(tiny), *args], needle)


@pytest.mark.parametrize("args,needle", [(["--target-size", "1000"], "below the smallest"),
                                         (["--target-size", "1GiB"], "above the largest"),
                                         (["--target-bpw", "1.0"], "below the smallest"),
                                         (["--target-bpw", "16"], "above the largest")])
def test_cli_infeasible_targets_say_the_range(capsys, tmp_path, tiny, args, needle) -> None:
    err = _fails(capsys, tmp_path, [str(tiny), *args], needle)
    assert re.search(r"feasible: [\d,]+-[\d,]+ bytes", err), err
