"""The conversion, step by step: checkpoint -> float GGUF -> expert plan -> typed GGUF -> report."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .archs import ArchAdapter, MoeShape
from .checkpoint import float_outtype, inspect_checkpoint
from .errors import GemqError
from .hf_to_gguf import hf_to_float_gguf
from .plan import ExpertPlan, load_plan, plan_units, uniform_plan
from .policy import TensorPolicy
from .router_ft import DEFAULT_EPOCHS, DEFAULT_LOSS, DEFAULT_LR, SELECT
from .stats import FISHER_LABELS
from .summary import print_summary
from .writer import WriteSummary, write_gguf

log = logging.getLogger("gemq")


@dataclass
class ConvertOptions:
    """Everything `convert.py` can be asked; defaults are what a user gets without flags."""

    model: str
    out: Path
    uniform: str | None = None
    plan: Path | None = None
    budget: float | None = None
    strategy: str = "gemq"
    granularity: str = "expert"
    types: list[str] | None = None
    max_types: int = 3
    tensor_types: list[str] = field(default_factory=list)
    non_expert: str | None = None
    imatrix: Path | None = None
    calib: list[str] = field(default_factory=list)
    calib_tokens: int = 32768
    seq_len: int = 512
    seed: int = 0
    fisher: str = FISHER_LABELS[0]  # "sampled": measured better than "data" (docs/allocation.md)
    finetune_routers: bool = False
    ft_loss: str = DEFAULT_LOSS
    ft_lr: float = DEFAULT_LR
    ft_epochs: int = DEFAULT_EPOCHS
    ft_select: str = SELECT[0]
    progressive: int = 0
    work_dir: Path | None = None
    keep_intermediate: bool = False
    dry_run: bool = False
    report_json: Path | None = None
    heatmap: Path | None = None
    verbose: bool = False


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


@dataclass
class Source:
    """The model being converted, as every step after validation sees it."""

    model_dir: Path
    config: Any
    adapter: ArchAdapter
    shape: MoeShape
    float_gguf: Path


def _expert_plan(opts: ConvertOptions, src: Source) -> tuple[ExpertPlan, dict[str, Any]]:
    """The type of every routed expert matrix, and what to record about how it was chosen."""
    chosen = [x for x in ("uniform", "plan", "budget") if getattr(opts, x) is not None]
    if len(chosen) != 1:
        raise GemqError("say how to type the experts: exactly one of --budget, --uniform or --plan.",
                        "e.g. --budget 3.0 (GEMQ), or --uniform Q4_K.")
    if (opts.finetune_routers or opts.progressive) and opts.budget is None:
        raise GemqError("--finetune-routers and --progressive work with --budget (they need the calibration).",
                        "add --budget BPW, or drop the router-tuning flags.")
    layers, n_experts = list(src.shape.moe_layers), src.shape.n_experts
    if opts.uniform is not None:
        return uniform_plan(layers, n_experts, opts.uniform), {"strategy": "uniform", "granularity": "tensor"}
    if opts.plan is not None:
        return load_plan(opts.plan, layers, n_experts), {"strategy": "plan", "granularity": "expert-proj"}
    from .gemq import allocate_plan
    return allocate_plan(opts, src)


def convert(opts: ConvertOptions) -> dict[str, Any]:
    """Run the whole conversion; returns the JSON report (also written next to the output)."""
    model_dir = resolve_model(opts.model)
    config, adapter, shape = inspect_checkpoint(model_dir)
    check_output(opts.out)
    policy = TensorPolicy.from_args(opts.tensor_types, opts.non_expert)
    if opts.budget is not None:
        from .gemq import check_request
        check_request(opts, shape)
    log.info("%s: %s, %d MoE layers x %d experts (top-%d)", model_dir, adapter.name, len(shape.moe_layers),
             shape.n_experts, shape.top_k)

    work = Path(tempfile.mkdtemp(prefix=".gemq-", dir=opts.work_dir or opts.out.expanduser().resolve().parent))
    try:
        float_gguf = work / f"{model_dir.name}.{float_outtype(config)}.gguf"
        log.info("step 1/3: Hugging Face -> %s GGUF (llama.cpp's converter)", float_outtype(config))
        hf_to_float_gguf(model_dir, float_gguf, float_outtype(config), verbose=opts.verbose)
        log.info("step 2/3: expert plan")
        plan, meta = _expert_plan(opts, Source(model_dir, config, adapter, shape, float_gguf))
        report: dict[str, Any] = {"model": str(model_dir), "architecture": adapter.name,
                                  "moe": shape.__dict__, **{k: v for k, v in meta.items() if not k.startswith("_")}}
        if opts.dry_run:
            report["units"] = plan_units(plan)
            _write_report(opts, report)
            return report
        log.info("step 3/3: quantize and write %s", opts.out)
        summary: WriteSummary = write_gguf(float_gguf, opts.out, plan, policy, imatrix=meta.get("_imatrix"),
                                           routers=meta.get("_routers"), metadata=meta,
                                           strict_plan=opts.plan is not None, quant_cache=meta.get("_cache"))
        report["file"] = summary.to_dict()
        report["units"] = plan_units(plan)
        print_summary(summary)
        _write_report(opts, report)
        if opts.keep_intermediate:
            kept = opts.out.with_suffix(f".{float_outtype(config)}.gguf")
            shutil.move(float_gguf, kept)
            report["intermediate"] = str(kept)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_report(opts: ConvertOptions, report: dict[str, Any]) -> None:
    path = opts.report_json or opts.out.with_suffix(".json")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)
    log.info("report: %s", path)
