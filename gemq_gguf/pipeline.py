"""The conversion, step by step: checkpoint -> float GGUF -> expert types -> typed GGUF -> check -> report."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .archs import ArchAdapter, MoeShape
from .convert.checkpoint import float_outtype, inspect_checkpoint, remote_code_policy, tied_embeddings
from .convert.hf_to_gguf import hf_to_float_gguf
from .convert.summary import print_summary
from .convert.weights_check import check_safetensors
from .convert.writer import write_gguf
from .disk import check_disk, run_needs
from .errors import GemqError
from .ggml.imatrix import read_imatrix
from .ggml.quant import SavedQuantCache
from .ggml.types import canonical
from .options import (AllocOptions, CalibOptions, ConvertRequest, FileTarget, OutputOptions, PlanFile, UniformTypes, VerifyOptions,
                      WholeFileOptions)
from .plan import ExpertTypes, PlanOrigin, load_plan, load_tensor_types, plan_units, tensor_rows, uniform_plan
from .policy import TensorPolicy
from .provenance import provenance
from .verify import Verification, verification_text, verify_file

log = logging.getLogger("gemq")


def resolve_model(model: str) -> Path:
    """'demo' means the built-in demo MoE (built on first use); anything else is a folder."""
    if model == "demo":
        from .demo import ensure_demo_model
        return ensure_demo_model()
    return Path(model).expanduser()


def check_output(out: Path, work_dir: Path | None = None) -> None:
    parent = out.expanduser().resolve().parent
    if out.is_dir():
        raise GemqError(f"output {out} is a folder.", "pass a file name, e.g. -o model-gemq-3.0.gguf.")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise GemqError(f"cannot write to {parent}.", "choose an output path in a writable folder.")
    if work_dir is not None and not (work_dir.is_dir() and os.access(work_dir, os.W_OK | os.X_OK)):
        raise GemqError(f"cannot write to the work dir {work_dir} (missing, or not writable).",
                        "create it, or pass a writable --work-dir (the float GGUF needs about the checkpoint's size).")


@dataclass(frozen=True)
class Source:
    """The model being converted, as every step after validation sees it."""

    model_dir: Path
    config: Any
    adapter: ArchAdapter
    shape: MoeShape

    @property
    def tied_output(self) -> bool:
        """Stage 1 must write the tied embedding as output.weight too (the family's loader needs it)."""
        return self.adapter.needs_output_tensor and tied_embeddings(self.config)


def open_source(model: str, trust_remote_code: bool = False) -> Source:
    """Resolve and validate the checkpoint (every cheap check before any heavy work)."""
    model_dir = resolve_model(model)
    return Source(model_dir, *inspect_checkpoint(model_dir, trust_remote_code))


def _check_request(req: ConvertRequest, src: Source) -> list[str]:
    """Everything about the request that can fail before stage 1; returns the candidate types of `--budget`."""
    check_output(req.output.path, req.output.work_dir)
    if req.calib.imatrix is not None:
        read_imatrix(req.calib.imatrix)  # a malformed file fails now, not after stage 1
    if isinstance(req.experts, PlanFile):
        load_plan(req.experts.path, list(src.shape.moe_layers), src.shape.n_experts)
        load_tensor_types(req.experts.path)
    if isinstance(req.experts, UniformTypes):
        canonical(req.experts.type)
    if not isinstance(req.experts, AllocOptions) and req.tune is not None:
        raise GemqError("--finetune-routers and --progressive work with --budget (they need the calibration; the "
                        "whole-file allocation does not tune routers yet).",
                        "use --budget BPW, or drop the router-tuning flags.")
    if isinstance(req.experts, WholeFileOptions):
        from .gemq.budget import check_whole_file
        return check_whole_file(req.experts, src.shape)[0]
    if not isinstance(req.experts, AllocOptions):
        if req.output.save_imatrix is not None:
            raise GemqError("--save-imatrix saves the calibration's imatrix, and only --budget calibrates.",
                            "add --budget BPW, or drop --save-imatrix.")
        return []
    from .gemq.budget import check_request
    return check_request(req.experts, src.shape)


def expert_types(req: ConvertRequest, src: Source, float_gguf: Path, types: list[str],
                 policy: TensorPolicy | None = None) -> ExpertTypes:
    """The type of every routed expert matrix (and, for a whole-file allocation or a plan written from
    one, of the non-expert tensors it decided), and what the writer and the report need besides."""
    layers, n_experts = list(src.shape.moe_layers), src.shape.n_experts
    imatrix = read_imatrix(req.calib.imatrix).means() if req.calib.imatrix else None
    match req.experts:
        case UniformTypes(type=t):
            return ExpertTypes(uniform_plan(layers, n_experts, t), PlanOrigin("uniform", "tensor"), imatrix=imatrix)
        case PlanFile(path=path):
            return ExpertTypes(load_plan(path, layers, n_experts), PlanOrigin("plan", "expert-proj"), imatrix=imatrix,
                               tensor_types=load_tensor_types(path))
        case WholeFileOptions() as whole:
            return _whole_file(req, src, float_gguf, whole, types, policy or TensorPolicy())
        case AllocOptions() as alloc:
            from .gemq.budget import allocate_experts
            return allocate_experts(src.model_dir, src.adapter, src.shape, float_gguf, alloc, types, req.calib,
                                    req.tune, req.output, req.cache)
    raise TypeError(f"unknown expert typing {req.experts!r}")


def check_merged_gate_up(float_gguf: Path, experts: Any) -> None:
    """A converter that keeps each expert's gate and up in one tensor (`ffn_gate_up_exps`) needs one type for
    both: refuse `--granularity expert-proj` before any calibration rather than at the write."""
    if not (isinstance(experts, (AllocOptions, WholeFileOptions)) and experts.granularity == "expert-proj"):
        return
    from gguf import GGUFReader
    if any(t.name.endswith("ffn_gate_up_exps.weight") for t in GGUFReader(float_gguf).tensors):
        raise GemqError("this architecture stores each expert's gate and up in one tensor, so they need one type.",
                        "use --granularity expert (or tensor).")


def _whole_file(req: ConvertRequest, src: Source, float_gguf: Path, opts: WholeFileOptions, types: list[str],
                policy: TensorPolicy) -> ExpertTypes:
    """`--target-bpw` / `--target-size`: the file's fixed parts measured on the float GGUF, an early
    check that the target is reachable, then the joint allocation (gemq.budget)."""
    from .convert.file_size import file_parts, quantized_shapes
    from .gemq.budget import allocate_whole_file, check_target
    tensor_types = [canonical(t) for t in opts.tensor_types]
    n_types = len(set(types)) if opts.max_types is None else min(opts.max_types, len(set(types)))
    parts = file_parts(float_gguf, policy, n_types, tuple(types))
    check_target(opts, src.shape, types, parts, quantized_shapes(float_gguf, policy), tensor_types)
    return allocate_whole_file(src.model_dir, src.adapter, src.shape, float_gguf, opts, types, tensor_types, parts,
                               req.calib, req.output, req.cache)


def convert(req: ConvertRequest) -> dict[str, Any]:
    """Run the whole conversion; returns the JSON report (also written next to the output).

    On any failure or interruption nothing this run started is left: the work dir goes, and the side
    outputs it created (GGUF, report, heatmap, saved imatrix) are removed; the GGUF only ever appears
    complete (the writer renames it into place)."""
    out = req.output
    created = [p for p in (out.path, out.report_path, out.heatmap_path, out.save_imatrix)
               if p is not None and not p.exists()]
    try:
        return _convert(req)
    except BaseException as e:
        for p in created:
            with contextlib.suppress(OSError):  # best effort: e.g. a read-only disk refuses even a no-op unlink
                p.unlink(missing_ok=True)
        if isinstance(e, OSError) and _disk_full(e):
            where = e.filename or out.work_dir or out.path.expanduser().resolve().parent
            raise GemqError(f"no space left on the disk while writing ({where}): {e.strerror or e}.",
                            "free disk space, or pass -o / --work-dir on a disk with room for the float GGUF "
                            "and the output.") from None
        raise


def _disk_full(e: OSError) -> bool:
    """ENOSPC (or quota, or file size limit), or numpy's `tofile` short write, which carries no errno."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    return e.errno is None and re.fullmatch(r"\d+ requested and \d+ written", str(e)) is not None


def _convert(req: ConvertRequest) -> dict[str, Any]:
    """Open the checkpoint, then run every step under the user's remote-code choice."""
    src = open_source(req.model, req.trust_remote_code)
    with remote_code_policy(src.model_dir, req.trust_remote_code):
        return _run(req, src)


def _run(req: ConvertRequest, src: Source) -> dict[str, Any]:
    """The steps: request checks, stage 1 in a work dir that always goes, expert types, write, report."""
    types = _check_request(req, src)
    policy = TensorPolicy.from_args(req.policy.tensor_types, req.policy.non_expert)
    out = req.output
    log.info("%s: %s, %d MoE layers x %d experts (top-%d)", src.model_dir, src.adapter.name,
             len(src.shape.moe_layers), src.shape.n_experts, src.shape.top_k)

    outtype = float_outtype(src.config)
    n = 4 if req.verify else 3
    out_dir = out.path.expanduser().resolve().parent
    _check_disk(req, src, outtype, types, policy, out.work_dir or out_dir, out_dir)
    work = Path(tempfile.mkdtemp(prefix=".gemq-", dir=out.work_dir or out_dir))
    try:
        float_gguf = work / f"{src.model_dir.name}.{outtype}.gguf"
        log.info("step 1/%d: Hugging Face -> %s GGUF (llama.cpp's converter)", n, outtype)
        hf_to_float_gguf(src.model_dir, float_gguf, outtype, verbose=req.verbose,
                         tied_output=src.tied_output)
        check_merged_gate_up(float_gguf, req.experts)
        log.info("step 2/%d: expert types", n)
        typed = expert_types(req, src, float_gguf, types, policy)
        o = typed.origin
        report: dict[str, Any] = {"model": str(src.model_dir), "architecture": src.adapter.name,
                                  "moe": src.shape.__dict__, "strategy": o.strategy, "granularity": o.granularity,
                                  "reproduce": provenance(req, src.model_dir)}
        if o.budget is not None:
            report.update(budget=o.budget, candidate_types=list(o.candidate_types))
        report.update(typed.report)
        if not out.dry_run:
            log.info("step 3/%d: quantize and write %s", n, out.path)
            target = req.experts.target if isinstance(req.experts, WholeFileOptions) else None
            summary = write_gguf(float_gguf, out.path, typed.plan, policy, imatrix=typed.imatrix,
                                 routers=typed.routers, origin=o, strict_plan=isinstance(req.experts, PlanFile),
                                 quant_cache=typed.quant_cache, tensor_types=typed.tensor_types,
                                 max_bytes=target.size if target else None)
            report["file"] = summary.to_dict()
            if isinstance(typed.quant_cache, SavedQuantCache):
                report["file"]["expert_matrices"] = typed.quant_cache.close()
            line = None
            if target is not None:
                report["whole_file"].update(_target_numbers(target, summary.file_bytes, summary.file_bpw),
                                            expert_bpw=summary.expert_bpw)
                line = report["whole_file"]["line"]
            verified = _verify(out, float_gguf, req.calib, req.verify, work) if req.verify else None
            print_summary(summary, verified.line() if verified else "not verified (--no-verify)", target=line)
            report["verification"] = verified.to_dict() if verified else None
        report["units"] = plan_units(typed.plan)
        if typed.tensor_types:
            report["tensors"] = tensor_rows(typed.tensor_types)
        if out.keep_intermediate and not out.dry_run:
            kept = out.path.with_suffix(f".{outtype}.gguf")
            shutil.move(float_gguf, kept)
            report["intermediate"] = str(kept)
        _write_report(out, report)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _target_numbers(target: FileTarget, file_bytes: int, file_bpw: float) -> dict[str, Any]:
    """The written file against its target: real size, and the slack left (bytes, or bpw)."""
    if target.size is not None:
        slack = target.size - file_bytes
        line = (f"target {target.spec} = {target.size:,} bytes: file {file_bytes:,} bytes, {slack:,} bytes "
                f"({slack / target.size:.4%}) under")
        return {"file_bytes": file_bytes, "slack_bytes": slack, "file_bpw": file_bpw, "line": line}
    assert target.bpw is not None
    line = f"target {target.bpw:g} bpw (whole file): file {file_bpw:.4f} bpw, {target.bpw - file_bpw:.4f} under"
    return {"file_bytes": file_bytes, "file_bpw": file_bpw, "slack_bpw": target.bpw - file_bpw, "line": line}


def _check_disk(req: ConvertRequest, src: Source, outtype: str, types: list[str], policy: TensorPolicy,
                work_dir: Path, out_dir: Path) -> None:
    """Fail before stage 1 when a disk cannot hold what the run will write there (disk.py)."""
    expert, other = types, [t for c, t in policy.defaults.items() if c != "router"] + [t for _, t in policy.overrides]
    match req.experts:
        case UniformTypes(type=t):
            expert = [canonical(t)]
        case PlanFile(path=path):
            expert = sorted({t for ts in load_plan(path, list(src.shape.moe_layers), src.shape.n_experts).values()
                             for t in ts})
            other += list(load_tensor_types(path).values())
        case WholeFileOptions() as whole:
            other += [canonical(t) for t in whole.tensor_types]
    calib, cache_dir = None, None
    if isinstance(req.experts, (AllocOptions, WholeFileOptions)):
        from .gemq.cache import cache_root
        seq = req.calib.seq_len
        calib = (-(-req.calib.tokens // seq) * seq, req.calib.memory)
        cache_dir = cache_root(req.cache)
    verify_tokens = req.verify.chunks * req.verify.ctx if req.verify and not req.output.dry_run else 0
    check_disk(run_needs(src.model_dir, check_safetensors(src.model_dir), src.config, src.shape, outtype=outtype,
                         tied_output=src.tied_output, work_dir=work_dir,
                         output_dir=None if req.output.dry_run else out_dir, expert_types=expert, other_types=other,
                         calib=calib, verify_tokens=verify_tokens, cache_dir=cache_dir))


def _verify(out: OutputOptions, float_gguf: Path, calib: CalibOptions, opts: VerifyOptions, work: Path) -> Verification:
    """Run the written file against the float GGUF on calibration text; a broken file (and its heatmap)
    is deleted."""
    from .gemq.calib import load_sources
    log.info("step 4/4: run %s in llama.cpp against the unquantized model", out.path)
    text = verification_text([(s.text, s.weight) for s in load_sources(calib.texts or None)], opts)
    try:
        return verify_file(out.path, float_gguf, text, opts, work / "verify")
    except BaseException:
        out.path.unlink(missing_ok=True)
        out.heatmap_path.unlink(missing_ok=True)
        raise


def _write_report(out: OutputOptions, report: dict[str, Any]) -> None:
    path = out.report_path
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(report, indent=1, default=str))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    log.info("report: %s", path)
