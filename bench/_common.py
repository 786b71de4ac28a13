"""Shared steps of the quality benchmarks: one calibration and cost table, many files, one evaluator.

Every benchmark row must differ from the others only in what the row names (allocation, recipe), so
the reference, the calibration, the imatrix and the non-expert policy are built once, here.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGUFReader

import numpy as np

from gemq_gguf.allocate import Allocation, AllocationProblem
from gemq_gguf.convert.hf_to_gguf import hf_to_float_gguf
from gemq_gguf.convert.writer import write_gguf
from gemq_gguf.data import eval_texts
from gemq_gguf.evaluate import evaluate_gguf
from gemq_gguf.gemq.budget import calibrate, cost_table
from gemq_gguf.ggml.names import EXPERT_RE
from gemq_gguf.options import DEFAULT_TYPES, CalibOptions, TuneOptions
from gemq_gguf.pipeline import Source, open_source
from gemq_gguf.plan import ExpertPlan, PlanOrigin, plan_from_allocation
from gemq_gguf.policy import TensorPolicy


BENCH_GRANULARITIES = ("expert", "tensor")


@dataclass
class Bench:
    """The model, its F32 reference GGUF, and (after `prepare_costs`) calibration results."""

    src: Source
    ref: Path
    out_dir: Path
    eval_chunks: int | None
    imatrix: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    problems: dict[str, AllocationProblem] = field(default_factory=dict)
    calib: CalibOptions | None = None
    prep_seconds: float = 0.0
    policy: TensorPolicy = field(default_factory=TensorPolicy)  # non-expert tensors of every written file

    @classmethod
    def open(cls, model: str, out_dir: Path, eval_chunks: int | None) -> "Bench":
        out_dir.mkdir(parents=True, exist_ok=True)
        src = open_source(model)
        ref = out_dir / f"{src.model_dir.name}.f32.gguf"
        if not ref.exists():
            hf_to_float_gguf(src.model_dir, ref, "f32", tied_output=src.tied_output)
        return cls(src, ref, out_dir, eval_chunks)

    def prepare_costs(self, calib_tokens: int, fisher: str = "sampled") -> None:
        """Calibrate once; the cost problems at expert and tensor granularity, each by the CLI's own
        `cost_table` (so a row measures what `convert.py --granularity G` ships).

        The imatrix and problems are kept in OUT_DIR/costs-*.npz (no pickle), so the benchmarks share
        one calibration (the expert bytes are quantized again when a file is written)."""
        t0 = time.perf_counter()
        self.calib = CalibOptions(tokens=calib_tokens, fisher=fisher)
        saved = self.out_dir / f"costs-{self.src.model_dir.name}-{calib_tokens}-{fisher}.npz"
        if saved.exists():
            self.imatrix, self.problems = load_costs(saved)
            return
        c = calibrate(self.src.model_dir, self.src.adapter, self.calib, self.out_dir)
        self.imatrix = c.imatrix
        self.problems = {}
        for g in BENCH_GRANULARITIES:
            table, quant = cost_table(c, self.src.adapter, self.src.shape, list(DEFAULT_TYPES), g, None)
            self.problems[g] = table.problem()
            self.cache.update(quant)
        self.prep_seconds = time.perf_counter() - t0
        save_costs(saved, self.imatrix, self.problems)

    def plan_of(self, alloc: Allocation) -> ExpertPlan:
        return plan_from_allocation(alloc, list(self.src.shape.moe_layers), self.src.shape.n_experts)

    def tuned_routers(self, plan: ExpertPlan, tune: TuneOptions) -> dict[str, Any] | None:
        """Routers tuned against this plan's quantized experts, on a fresh copy of the model."""
        from gemq_gguf.gemq.budget import calib_tokens
        from gemq_gguf.gemq.router_ft import ModelRunner, tune_for_plan
        from gemq_gguf.gemq.stats import load_for_calibration
        assert self.calib is not None, "prepare_costs first"
        model = load_for_calibration(self.src.model_dir)
        runner = ModelRunner(model, self.src.adapter, self.imatrix, dict(self.cache))
        return tune_for_plan(runner, calib_tokens(self.src.model_dir, self.calib), plan, tune,
                             seed=self.calib.seed).routers

    def write(self, name: str, plan: ExpertPlan, origin: PlanOrigin, routers: dict | None = None) -> Path:
        out = self.out_dir / f"{name}.gguf"
        write_gguf(self.ref, out, plan, self.policy, imatrix=self.imatrix, routers=routers,
                   quant_cache=dict(self.cache), origin=origin, progress=False)
        return out

    def evaluate(self, path: Path) -> dict[str, Any]:
        """KLD/PPL/top-1 vs the F32 reference, plus size facts read from the file itself."""
        res = evaluate_gguf(path, self.ref, eval_texts(), ctx=512, max_chunks=self.eval_chunks,
                            ref_cache_dir=self.out_dir / "refcache")
        return {**file_facts(path), "ppl": res.total.ppl, "ppl_base": res.total.ppl_base,
                "kld_mean": res.total.kld_mean, "kld_p999": res.total.kld_p999, "kld_p99": res.total.kld_p99,
                "same_top_p": res.total.same_top_p, "kld_by_domain": {d: s.kld_mean for d, s in res.domains.items()}}


def file_facts(path: Path) -> dict[str, float]:
    """Size, whole-file bpw and routed-expert bpw of any GGUF (ours or llama-quantize's)."""
    tensors = [t for t in GGUFReader(path).tensors if not t.name.endswith(".qmap")]
    expert = [t for t in tensors if EXPERT_RE.match(t.name) or "_exps.q" in t.name]
    bpw = lambda ts: 8.0 * sum(int(t.n_bytes) for t in ts) / max(sum(int(t.n_elements) for t in ts), 1)  # noqa: E731
    return {"file_mib": path.stat().st_size / 2**20, "file_bpw": bpw(tensors), "expert_bpw": bpw(expert)}


def save_rows(out_dir: Path, name: str, rows: list[dict], extra: dict | None = None) -> None:
    (out_dir / f"{name}.json").write_text(json.dumps({"rows": rows, **(extra or {})}, indent=1, default=str))


def save_costs(path: Path, imatrix: dict[str, np.ndarray], problems: dict[str, AllocationProblem]) -> None:
    """imatrix and cost problems as plain arrays plus a JSON index (loads with allow_pickle=False)."""
    arrays = {f"imatrix:{k}": v for k, v in imatrix.items()}
    index = {}
    for g, p in problems.items():
        arrays.update({f"{g}:cost": p.cost, f"{g}:params": p.params, f"{g}:bits": p.bit_matrix})
        index[g] = {"units": [list(u) for u in p.units], "types": list(p.types)}
    arrays["index"] = np.array(json.dumps(index))
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_costs(path: Path) -> tuple[dict[str, np.ndarray], dict[str, AllocationProblem]]:
    with np.load(path, allow_pickle=False) as z:
        index = json.loads(str(z["index"]))
        imatrix = {k.split(":", 1)[1]: z[k] for k in z.files if k.startswith("imatrix:")}
        problems = {g: AllocationProblem.build([tuple(u) for u in v["units"]], v["types"], z[f"{g}:cost"],
                                               z[f"{g}:params"], bits=z[f"{g}:bits"]) for g, v in index.items()}
    return imatrix, problems
