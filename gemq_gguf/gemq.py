"""`--budget`: calibrate, estimate per-expert costs with ggml's quantizer, solve the global allocation.

This is the glue between the pure pieces (calib, stats, costs, allocate, report) and the pipeline;
it returns an expert plan plus what the writer and the report need (imatrix, quantized bytes).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from .allocate import DEFAULT_TYPES, AllocationProblem, check_budget, solve
from .costs import effective_type, matrix_bits, unit_keys
from .errors import GemqError
from .ggml_quant import canonical
from .plan import ExpertPlan, plan_from_units
from .report import plot_heatmap, print_allocation, report_dict

if TYPE_CHECKING:
    from .archs import MoeShape
    from .pipeline import ConvertOptions, Source

log = logging.getLogger("gemq")


def _widths(shape: MoeShape) -> dict[str, tuple[int, int]]:
    """(rows, row width) of each expert projection, in ggml terms."""
    return {"gate": (shape.expert_ffn, shape.hidden), "up": (shape.expert_ffn, shape.hidden),
            "down": (shape.hidden, shape.expert_ffn)}


def size_problem(shape: MoeShape, types: list[str], granularity: str, has_imatrix: bool) -> AllocationProblem:
    """The allocation problem with exact bits and zero costs: budget checks and the uniform baseline need
    no calibration. Types a projection cannot take are not allowed (expert granularity: llama.cpp's fallback)."""
    units = unit_keys(list(shape.moe_layers), shape.n_experts, granularity)
    widths = _widths(shape)
    fallback = granularity == "expert"
    bits = np.ones((len(units), len(types)))
    cost = np.zeros_like(bits)
    params = np.zeros(len(units))
    for u, (_, expert, proj) in enumerate(units):
        projs = ("gate", "up", "down") if proj is None else (proj,)
        n = shape.n_experts if expert is None else 1
        params[u] = n * sum(widths[p][0] * widths[p][1] for p in projs)
        for t, name in enumerate(types):
            eff = [effective_type(name, widths[p][1], fallback, has_imatrix) for p in projs]
            if any(e is None for e in eff):
                cost[u, t] = np.inf
            else:
                bits[u, t] = n * sum(matrix_bits(widths[p][0], widths[p][1], e) for p, e in zip(projs, eff))
    return AllocationProblem.build(units, types, cost, params, bits=bits)


def check_request(opts: ConvertOptions, shape: MoeShape) -> list[str]:
    """Validate types and budget before any heavy work; returns the candidate types."""
    types = [canonical(t) for t in (opts.types or DEFAULT_TYPES)]
    problem = size_problem(shape, types, opts.granularity, has_imatrix=True)
    budget = float(opts.budget)  # type: ignore[arg-type]
    check_budget(problem, budget)
    hi = problem.bpw_range()[1]
    if budget > hi * (1 + 1e-12):
        raise GemqError(f"budget {budget:g} bpw is above the highest reachable average ({hi:.4f} bpw) with types "
                        f"{', '.join(types)}: every expert would get the widest type.",
                        f"use --budget up to {hi:.4f}, add a wider type (e.g. Q8_0) to --types, or use --uniform.")
    return types


def calib_tokens(opts: ConvertOptions, src: Source) -> Any:
    """The calibration tokens [n_seq, seq_len] (seeded: the same on every call)."""
    from transformers import AutoTokenizer

    from .calib import calibration_tokens
    tokenizer = AutoTokenizer.from_pretrained(src.model_dir)
    return calibration_tokens(tokenizer, opts.calib or None, opts.calib_tokens, opts.seq_len, opts.seed)


def calibrate(opts: ConvertOptions, src: Source) -> tuple[Any, Any, dict[str, np.ndarray]]:
    """(model, stats, imatrix means by GGUF name): one forward+backward pass over the calibration text."""
    from .imatrix_io import read_imatrix
    from .stats import collect_stats, load_for_calibration

    tokens = calib_tokens(opts, src)
    log.info("calibration: %d sequences x %d tokens", *tokens.shape)
    model = load_for_calibration(src.model_dir)
    stats = collect_stats(model, src.adapter, tokens, progress=True, work_dir=src.float_gguf.parent,
                          datasets=[str(c) for c in opts.calib] or ["gemq-gguf built-in mix"],
                          labels=opts.fisher, seed=opts.seed)
    imatrix = (read_imatrix(opts.imatrix) if opts.imatrix else stats.imatrix()).means()
    return model, stats, imatrix


def allocate_plan(opts: ConvertOptions, src: Source) -> tuple[ExpertPlan, dict[str, Any]]:
    """Expert plan for `--budget` under `--strategy`, with the report, heatmap and writer inputs."""
    from .costs import estimate_costs, prune_cache

    types = check_request(opts, src.shape)
    budget = float(opts.budget)  # type: ignore[arg-type]
    model, stats, imatrix = calibrate(opts, src)
    cache: dict = {}
    extras: dict[str, Any] = {"calibration": {"sequences": stats.n_seq, "seq_len": stats.seq_len,
                                              "loss": stats.loss, "datasets": stats.datasets}}
    if opts.strategy == "uniform":
        problem = size_problem(src.shape, types, opts.granularity, has_imatrix=True)
    else:
        table = estimate_costs(model, src.adapter, stats, imatrix, types=types, granularity=opts.granularity,
                               cache=cache, progress=True)
        problem = table.problem()
        extras["never_routed_experts"] = [f"L{l}.E{e}" for l, e in table.never_routed]
        extras["cost_notes"] = table.notes
        extras["cost_seconds"] = table.seconds
    del stats
    alloc, tuned = _solve_and_tune(opts, src, model, imatrix, problem, cache)
    del model
    plan = plan_from_units(alloc.to_dict()["units"], list(src.shape.moe_layers), src.shape.n_experts)
    prune_cache(cache, plan)
    print_allocation(alloc, extras)
    heatmap = opts.heatmap or opts.out.with_suffix(".png")
    plot_heatmap(alloc, heatmap, title=f"{src.model_dir.name}: {opts.strategy} {budget} bpw ({opts.granularity})")
    extras["heatmap"] = str(heatmap)
    if alloc.bpw > budget + 1e-9:
        raise GemqError(f"the allocation uses {alloc.bpw:.4f} bpw, over the budget {budget}.", "report this as a bug.")
    return plan, {"strategy": opts.strategy, "granularity": opts.granularity, "budget": budget,
                  "candidate_types": types, "allocation": report_dict(alloc, extras),
                  **tuned, "_imatrix": imatrix, "_cache": cache}


def _solve_and_tune(opts: ConvertOptions, src: Source, model: Any, imatrix: dict[str, np.ndarray],
                    problem: AllocationProblem, cache: dict) -> tuple[Any, dict[str, Any]]:
    """The allocation at the budget, and with --finetune-routers / --progressive the tuned routers
    (`_routers`) and their report sections (router_ft.py, progressive.py)."""
    if opts.progressive:
        from .progressive import progressive_allocation
        return progressive_allocation(opts, src, model, calib_tokens(opts, src), imatrix, problem, cache)
    alloc = solve(opts.strategy, problem, float(opts.budget), max_types=opts.max_types)  # type: ignore[arg-type]
    if not opts.finetune_routers:
        return alloc, {}
    from .router_ft import tune_for_plan
    plan = plan_from_units(alloc.to_dict()["units"], list(src.shape.moe_layers), src.shape.n_experts)
    return alloc, tune_for_plan(model, src.adapter, calib_tokens(opts, src), plan, imatrix, cache,
                                loss=opts.ft_loss, seed=opts.seed, lr=opts.ft_lr, epochs=opts.ft_epochs,
                                select=opts.ft_select)
