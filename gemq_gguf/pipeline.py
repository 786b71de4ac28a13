"""The conversion, step by step: checkpoint -> float GGUF -> expert types -> typed GGUF -> report."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .archs import ArchAdapter, MoeShape
from .convert.checkpoint import float_outtype, inspect_checkpoint
from .convert.hf_to_gguf import hf_to_float_gguf
from .convert.summary import print_summary
from .convert.writer import write_gguf
from .errors import GemqError
from .ggml.imatrix import read_imatrix
from .options import AllocOptions, ConvertRequest, OutputOptions, PlanFile, UniformTypes
from .plan import ExpertTypes, PlanOrigin, load_plan, plan_units, uniform_plan
from .policy import TensorPolicy

log = logging.getLogger("gemq")


def resolve_model(model: str) -> Path:
    """'demo' means the built-in demo MoE (built on first use); anything else is a folder."""
    if model == "demo":
        from .demo import ensure_demo_model
        return ensure_demo_model()
    return Path(model).expanduser()


def check_output(out: Path) -> None:
    parent = out.expanduser().resolve().parent
    if out.is_dir():
        raise GemqError(f"output {out} is a folder.", "pass a file name, e.g. -o model-gemq-3.0.gguf.")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise GemqError(f"cannot write to {parent}.", "choose an output path in a writable folder.")


@dataclass(frozen=True)
class Source:
    """The model being converted, as every step after validation sees it."""

    model_dir: Path
    config: Any
    adapter: ArchAdapter
    shape: MoeShape


def open_source(model: str) -> Source:
    """Resolve and validate the checkpoint (every cheap check before any heavy work)."""
    model_dir = resolve_model(model)
    return Source(model_dir, *inspect_checkpoint(model_dir))


def _check_request(req: ConvertRequest, src: Source) -> list[str]:
    """Everything about the request that can fail before stage 1; returns the candidate types of `--budget`."""
    check_output(req.output.path)
    if not isinstance(req.experts, AllocOptions):
        if req.tune is not None:
            raise GemqError("--finetune-routers and --progressive work with --budget (they need the calibration).",
                            "add --budget BPW, or drop the router-tuning flags.")
        if req.output.save_imatrix is not None:
            raise GemqError("--save-imatrix saves the calibration's imatrix, and only --budget calibrates.",
                            "add --budget BPW, or drop --save-imatrix.")
        return []
    from .gemq.budget import check_request
    return check_request(req.experts, src.shape)


def expert_types(req: ConvertRequest, src: Source, float_gguf: Path, types: list[str]) -> ExpertTypes:
    """The type of every routed expert matrix, and what the writer and the report need besides."""
    layers, n_experts = list(src.shape.moe_layers), src.shape.n_experts
    imatrix = read_imatrix(req.calib.imatrix).means() if req.calib.imatrix else None
    match req.experts:
        case UniformTypes(type=t):
            return ExpertTypes(uniform_plan(layers, n_experts, t), PlanOrigin("uniform", "tensor"), imatrix=imatrix)
        case PlanFile(path=path):
            return ExpertTypes(load_plan(path, layers, n_experts), PlanOrigin("plan", "expert-proj"), imatrix=imatrix)
        case AllocOptions() as alloc:
            from .gemq.budget import allocate_experts
            return allocate_experts(src.model_dir, src.adapter, src.shape, float_gguf, alloc, types, req.calib,
                                    req.tune, req.output, req.cache)
    raise TypeError(f"unknown expert typing {req.experts!r}")


def convert(req: ConvertRequest) -> dict[str, Any]:
    """Run the whole conversion; returns the JSON report (also written next to the output)."""
    src = open_source(req.model)
    types = _check_request(req, src)
    policy = TensorPolicy.from_args(req.policy.tensor_types, req.policy.non_expert)
    out = req.output
    log.info("%s: %s, %d MoE layers x %d experts (top-%d)", src.model_dir, src.adapter.name,
             len(src.shape.moe_layers), src.shape.n_experts, src.shape.top_k)

    outtype = float_outtype(src.config)
    work = Path(tempfile.mkdtemp(prefix=".gemq-", dir=out.work_dir or out.path.expanduser().resolve().parent))
    try:
        float_gguf = work / f"{src.model_dir.name}.{outtype}.gguf"
        log.info("step 1/3: Hugging Face -> %s GGUF (llama.cpp's converter)", outtype)
        hf_to_float_gguf(src.model_dir, float_gguf, outtype, verbose=req.verbose)
        log.info("step 2/3: expert types")
        typed = expert_types(req, src, float_gguf, types)
        o = typed.origin
        report: dict[str, Any] = {"model": str(src.model_dir), "architecture": src.adapter.name,
                                  "moe": src.shape.__dict__, "strategy": o.strategy, "granularity": o.granularity}
        if o.budget is not None:
            report.update(budget=o.budget, candidate_types=list(o.candidate_types))
        report.update(typed.report)
        if not out.dry_run:
            log.info("step 3/3: quantize and write %s", out.path)
            summary = write_gguf(float_gguf, out.path, typed.plan, policy, imatrix=typed.imatrix,
                                 routers=typed.routers, origin=o, strict_plan=isinstance(req.experts, PlanFile),
                                 quant_cache=typed.quant_cache)
            report["file"] = summary.to_dict()
            print_summary(summary)
        report["units"] = plan_units(typed.plan)
        if out.keep_intermediate and not out.dry_run:
            kept = out.path.with_suffix(f".{outtype}.gguf")
            shutil.move(float_gguf, kept)
            report["intermediate"] = str(kept)
        _write_report(out, report)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_report(out: OutputOptions, report: dict[str, Any]) -> None:
    path = out.report_path
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)
    log.info("report: %s", path)
