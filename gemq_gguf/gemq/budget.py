"""`--budget`: calibrate, estimate per-expert costs with ggml's quantizer, solve the global allocation,
and optionally tune the routers against the result. `--target-bpw` / `--target-size`: the same with the
non-expert tensors' costs (tensor_costs.py) in one allocation over the whole file (allocate/joint.py).

The glue between the pure pieces (calib, stats, costs, allocate, report): it returns the expert types
plus what the writer and the report need (imatrix, already quantized bytes, tuned routers).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..allocate import Allocation, AllocationProblem, check_budget, solve
from ..allocate.joint import FileBits, FileParts, JointProblem, free_bits, joint_problem
from ..archs import ArchAdapter, MoeShape
from ..errors import GemqError
from ..ggml.imatrix import read_imatrix, write_imatrix
from ..ggml.quant import QuantCache
from ..ggml.types import canonical, fitting_type, type_info
from ..options import STRATEGIES, AllocOptions, CacheOptions, CalibOptions, OutputOptions, TuneOptions, WholeFileOptions
from ..plan import ExpertTypes, PlanOrigin, plan_from_allocation
from ..report import plot_heatmap, print_allocation, report_dict, tensor_section
from .calib import calibration_tokens
from .cache import StatsCache, open_cache
from .costs import CostTable, check_cost_rows, cost_fraction, estimate_costs, prune_cache
from .quant_store import StoredQuant, store_key
from .stats import CalibStats, collect_stats, load_for_calibration
from .streaming import open_layer_source, stream_stats, streamed_costs, use_streaming
from .units import Widths, unit_bits, unit_keys, unit_projs

log = logging.getLogger("gemq")


def expert_widths(shape: MoeShape) -> Widths:
    """(rows, row width) of each expert projection, in ggml terms."""
    return {p: (shape.hidden, shape.expert_ffn) if p == "down" else (shape.expert_ffn, shape.hidden)
            for p in shape.projs}


def size_problem(shape: MoeShape, types: list[str], granularity: str, has_imatrix: bool) -> AllocationProblem:
    """The allocation problem with exact bits and zero costs: budget checks and the uniform baseline need
    no calibration. Types a projection cannot take are not allowed (expert granularity: llama.cpp's fallback)."""
    units = unit_keys(list(shape.moe_layers), shape.n_experts, granularity, shape.projs)
    widths = expert_widths(shape)
    bits = np.empty((len(units), len(types)))
    cost = np.zeros_like(bits)
    params = np.zeros(len(units))
    for u, unit in enumerate(units):
        projs, n = unit_projs(unit, shape.projs), shape.n_experts if unit[1] is None else 1
        params[u] = n * sum(widths[p][0] * widths[p][1] for p in projs)
        bits[u], allowed = unit_bits(widths, projs, types, n, granularity == "expert",
                                     dict.fromkeys(shape.projs, has_imatrix))
        cost[u, ~allowed] = np.inf
    return AllocationProblem.build(units, types, cost, params, bits=bits)


def cost_rows(requested: float | None, shape: MoeShape) -> float:
    """`--cost-rows` for this model (`auto`: by the expert matrices' row counts, `costs.cost_fraction`)."""
    return cost_fraction(requested, [rows for rows, _ in expert_widths(shape).values()])


def check_request(opts: AllocOptions, shape: MoeShape) -> list[str]:
    """Validate types and budget before any heavy work; returns the candidate types."""
    types = [canonical(t) for t in opts.types]
    check_cost_rows(opts.cost_rows)
    problem = size_problem(shape, types, opts.granularity, has_imatrix=True)
    check_budget(problem, opts.budget)
    hi = problem.bpw_range()[1]
    if opts.budget > hi * (1 + 1e-12):
        raise GemqError(f"budget {opts.budget:g} bpw is above the highest reachable average ({hi:.4f} bpw) with "
                        f"types {', '.join(types)}: every expert would get the widest type.",
                        f"use --budget up to {hi:.4f}, add a wider type (e.g. Q8_0) to --types, or use --uniform.")
    return types


def check_whole_file(opts: WholeFileOptions, shape: MoeShape) -> tuple[list[str], list[str]]:
    """Validate a whole-file request before any heavy work; returns the experts' and the other tensors'
    candidate types. Whether the target is reachable needs the float GGUF (`check_target`)."""
    if opts.strategy != STRATEGIES[0]:
        raise GemqError(f"--strategy {opts.strategy} does not take --target-bpw / --target-size (the whole-file "
                        "allocation is one integer program).", "drop --strategy, or use --budget.")
    if opts.target.bpw is not None and not (np.isfinite(opts.target.bpw) and opts.target.bpw > 0):
        raise GemqError(f"--target-bpw {opts.target.bpw:g} is not a positive number.", "use e.g. --target-bpw 4.5.")
    types = [canonical(t) for t in opts.types]
    check_cost_rows(opts.cost_rows)
    size_problem(shape, types, opts.granularity, has_imatrix=True)  # every expert unit has an allowed type
    return types, [canonical(t) for t in opts.tensor_types]


def calib_tokens(model_dir: Path, calib: CalibOptions) -> torch.Tensor:
    """The calibration tokens [n_seq, seq_len] (seeded: the same on every call)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return calibration_tokens(tokenizer, calib.texts or None, calib.tokens, calib.seq_len, calib.seed)


@dataclass
class Calibration:
    """What one forward + backward pass over the calibration text gave (or the cache kept of it).

    `model` is the whole model; None when the statistics were layer-streamed (`stream`) or came from
    the cache. Later steps get weights through `costs` (layer by layer when streaming) and, when not
    streaming, `whole_model` (router tuning streams too when `stream`: router_stream.py)."""

    model_dir: Path
    model: nn.Module | None
    tokens: torch.Tensor
    stats: CalibStats
    imatrix: dict[str, np.ndarray]  # per-matrix means by GGUF name: ours, or the user's --imatrix
    stream: bool = False            # --calib-memory's decision: costs read one layer's weights at a time
    cache_key: str | None = None    # the statistics' cache key, when cached

    def costs(self, adapter: ArchAdapter, **kwargs: Any) -> CostTable:
        """The cost table; when streaming, each layer's weights are read while its costs are computed."""
        if not self.stream:
            return estimate_costs(self.whole_model(), adapter, self.stats, self.imatrix, **kwargs)
        return streamed_costs(open_layer_source(self.model_dir, adapter), adapter, self.stats, self.imatrix, **kwargs)

    def whole_model(self) -> nn.Module:
        """The model with all its weights, loaded on first use."""
        if self.model is None:
            if self.stream:
                log.info("loading the whole model (calibration was layer-streamed)")
            self.model = load_for_calibration(self.model_dir)
        return self.model


def _numerics() -> str:
    """The device kind the statistics and costs are computed on (load_for_calibration's choice)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def calibrate(model_dir: Path, adapter: ArchAdapter, calib: CalibOptions, work_dir: Path,
              cache: StatsCache | None = None) -> Calibration:
    """Tokenize the calibration text once and gather the statistics (or take them from `cache`): with the
    whole model loaded, or layer-streamed from the safetensors shards (`--calib-memory`; the same values)."""
    tokens = calib_tokens(model_dir, calib)
    log.info("calibration: %d sequences x %d tokens", *tokens.shape)
    stream = use_streaming(model_dir, calib.memory)
    entry = cache.calibration(model_dir, tokens, calib, _numerics()) if cache is not None else None
    stats = entry.load() if entry is not None else None
    model = None
    if stats is None:
        kwargs = dict(progress=True, work_dir=work_dir, datasets=list(calib.texts) or ["gemq-gguf built-in mix"],
                      labels=calib.fisher, seed=calib.seed, tensor_tokens=calib.tensor_tokens)
        if stream:
            log.info("calibration: layer-streamed (one decoder layer's weights at a time)")
            source = open_layer_source(model_dir, adapter)
            try:
                stats = stream_stats(source, adapter, tokens, **kwargs)
            finally:
                source.release()
        else:
            model = load_for_calibration(model_dir)
            stats = collect_stats(model, adapter, tokens, **kwargs)
        if entry is not None:
            entry.save(stats)
    imatrix = (read_imatrix(calib.imatrix) if calib.imatrix else stats.imatrix()).means()
    return Calibration(model_dir, model, tokens, stats, imatrix, stream, entry.key if entry is not None else None)


def cost_table(c: Calibration, adapter: ArchAdapter, shape: MoeShape, types: list[str], granularity: str,
               cache: StatsCache | None, rows: float = 1.0) -> tuple[CostTable, QuantCache]:
    """The GEMQ costs `--budget` solves (from the cache when there, finishing an interrupted pass from its
    last layer) and the quantized candidates for the writer. The benchmarks call this too, so what they
    measure is what ships (e.g. never-routed experts counted as in `estimate_costs`, at every granularity)."""
    if cache is None or c.cache_key is None:
        quant: QuantCache = {}
        return c.costs(adapter, types=types, granularity=granularity, cache=quant, progress=True, rows=rows), quant
    entry = cache.costs(c.cache_key, types, granularity, c.imatrix, _numerics(), list(shape.moe_layers), rows)
    table = entry.table(shape.n_experts, shape.projs)
    if table is None:
        table = c.costs(adapter, types=types, granularity=granularity, store=entry, progress=True, rows=rows)
    return table, entry.quant_cache()


def writer_cache(c: Calibration, store: StatsCache | None, cache: QuantCache) -> QuantCache:
    """What the writer reads quantized experts from: `cache` (the cost pass's candidates), and with the
    statistics cache on, the store of what earlier writes quantized (gemq.quant_store), which it extends."""
    if store is None or c.cache_key is None:
        return cache
    return StoredQuant(store.root, store_key(c.cache_key, c.imatrix), cache)


def allocate_experts(model_dir: Path, adapter: ArchAdapter, shape: MoeShape, float_gguf: Path, opts: AllocOptions,
                     types: list[str], calib: CalibOptions, tune: TuneOptions | None,
                     output: OutputOptions, cache_opts: CacheOptions = CacheOptions()) -> ExpertTypes:
    """Expert types for `--budget` under `--strategy` (`types`: the candidates `check_request` accepted),
    with the report sections, heatmap and writer inputs."""
    store = open_cache(cache_opts)
    c = calibrate(model_dir, adapter, calib, float_gguf.parent, store)
    if output.save_imatrix is not None:
        write_imatrix(output.save_imatrix, c.stats.imatrix())
        log.info("imatrix: %s", output.save_imatrix)
    cache: QuantCache = {}
    report: dict[str, Any] = {"calibration": {"sequences": c.stats.n_seq, "seq_len": c.stats.seq_len,
                                              "loss": c.stats.loss, "datasets": c.stats.datasets}}
    opts = replace(opts, cost_rows=cost_rows(opts.cost_rows, shape))
    if opts.strategy == "uniform":
        problem = size_problem(shape, types, opts.granularity, has_imatrix=True)
    else:
        table, cache = cost_table(c, adapter, shape, types, opts.granularity, store, opts.cost_rows)
        problem = table.problem()
        report.update(never_routed_experts=[f"L{l}.E{e}" for l, e in table.never_routed], cost_notes=table.notes,
                      cost_seconds=table.seconds, cost_rows=opts.cost_rows)
    del c.stats
    alloc, routers, tuning_report = _solve_and_tune(c, adapter, shape, float_gguf, problem, cache, opts,
                                                    calib, tune)
    plan = plan_from_allocation(alloc, list(shape.moe_layers), shape.n_experts)
    if isinstance(cache, dict):  # the cache's files cost no memory
        prune_cache(cache, plan)
    print_allocation(alloc, report)
    plot_heatmap(alloc, output.heatmap_path, title=f"{model_dir.name}: {opts.strategy} {opts.budget} bpw "
                                                   f"({opts.granularity})")
    report["heatmap"] = str(output.heatmap_path)
    if alloc.bpw > opts.budget + 1e-9:
        raise GemqError(f"the allocation uses {alloc.bpw:.4f} bpw, over the budget {opts.budget}.",
                        "report this as a bug.")
    return ExpertTypes(plan=plan, origin=PlanOrigin(opts.strategy, opts.granularity, opts.budget, tuple(types)),
                       report={"allocation": report_dict(alloc, report), **tuning_report}, imatrix=c.imatrix,
                       quant_cache=writer_cache(c, store, cache), routers=routers)


def _solve_and_tune(c: Calibration, adapter: ArchAdapter, shape: MoeShape, float_gguf: Path, problem: AllocationProblem,
                    cache: QuantCache, opts: AllocOptions, calib: CalibOptions,
                    tune: TuneOptions | None) -> tuple[Allocation, dict[str, np.ndarray] | None, dict[str, Any]]:
    """The allocation at the budget, and with router tuning (once, or progressively) the tuned routers
    and their report sections (router_ft.py, progressive.py). When calibration streamed, so does the
    tuning (router_stream.py), in memory bounded by one layer: each training step then reads every
    layer twice (forward and recomputation), the teacher pass and each held-out score once."""
    if tune is None:
        return solve(opts.strategy, problem, opts.budget, max_types=opts.max_types), None, {}
    from .progressive import Measure, progressive_allocation, whole_model_measure
    from .router_ft import ModelRunner, Runner, tune_for_plan
    types = list(problem.types)
    runner: Runner
    measure: Measure
    if c.stream:  # teacher pass, training steps, scores and re-measurement streamed: no whole model
        from .router_stream import StreamedRunner, streamed_measure
        streamed = StreamedRunner(open_layer_source(c.model_dir, adapter), adapter, c.imatrix, cache,
                                  work_dir=float_gguf.parent)
        runner, measure = streamed, streamed_measure(streamed, c.tokens, types, opts, calib)
    else:
        in_memory = ModelRunner(c.whole_model(), adapter, c.imatrix, cache)
        runner, measure = in_memory, whole_model_measure(in_memory, float_gguf, c.tokens, types, opts, calib)
    if tune.progressive:
        res = progressive_allocation(runner, shape, c.tokens, problem, measure, opts, tune, calib)
        return res.allocation, res.tuning.routers, {"router_tuning": res.tuning.report, "progressive": res.steps}
    alloc = solve(opts.strategy, problem, opts.budget, max_types=opts.max_types)
    plan = plan_from_allocation(alloc, list(shape.moe_layers), shape.n_experts)
    tuning = tune_for_plan(runner, c.tokens, plan, tune, seed=calib.seed)
    return alloc, tuning.routers, {"router_tuning": tuning.report}


def check_target(opts: WholeFileOptions, shape: MoeShape, types: list[str], parts: FileParts,
                 widths: dict[str, tuple[int, int]], tensor_types: list[str]) -> None:
    """Before calibration: a target no file can meet fails now. The non-expert tensors whose types the
    allocation may choose are not known yet (tensor_costs decides), so every tensor the policy quantizes
    (`widths`: name -> (rows, row width)) counts with every candidate type; the exact check follows the costs."""
    names = sorted(widths)
    bits = np.array([[widths[n][0] * type_info(fitting_type(t, widths[n][1])).row_bytes(widths[n][1]) * 8.0
                      for t in tensor_types] for n in names]).reshape(len(names), len(tensor_types))
    params = np.array([widths[n][0] * widths[n][1] for n in names], dtype=np.float64)
    experts = size_problem(shape, types, opts.granularity, has_imatrix=True)
    joint = joint_problem(experts, names, tensor_types, np.zeros_like(bits), bits, params)
    target, what, with_overhead = parts.target_bits(opts.target)
    fixed = parts.fixed(set(names))
    free_bits(target, fixed if with_overhead else fixed.without_overhead(), joint.problem, what)


def allocate_whole_file(model_dir: Path, adapter: ArchAdapter, shape: MoeShape, float_gguf: Path,
                        opts: WholeFileOptions, types: list[str], tensor_types: list[str], parts: FileParts,
                        calib: CalibOptions, output: OutputOptions,
                        cache_opts: CacheOptions = CacheOptions()) -> ExpertTypes:
    """Types for every routed expert and every non-expert tensor with a measured cost, minimizing the
    predicted loss under the file target (`parts`: what the file holds besides the choices)."""
    from .tensor_costs import tensor_cost_table
    store = open_cache(cache_opts)
    c = calibrate(model_dir, adapter, calib, float_gguf.parent, store)
    if output.save_imatrix is not None:
        write_imatrix(output.save_imatrix, c.stats.imatrix())
        log.info("imatrix: %s", output.save_imatrix)
    report: dict[str, Any] = {"calibration": {"sequences": c.stats.n_seq, "seq_len": c.stats.seq_len,
                                              "loss": c.stats.loss, "datasets": c.stats.datasets}}
    rows = cost_rows(opts.cost_rows, shape)
    table, cache = cost_table(c, adapter, shape, types, opts.granularity, store, rows)
    tstore = store.tensor_costs(c.cache_key, tensor_types, c.imatrix, float_gguf, _numerics()) \
        if store is not None and c.cache_key is not None else None
    tcost = tensor_cost_table(c.stats, float_gguf, tensor_types, imatrix=c.imatrix, store=tstore)
    del c.stats
    joint = joint_problem(table.problem(), tcost.names, tcost.types, tcost.cost, tcost.bits, tcost.params)
    target, what, with_overhead = parts.target_bits(opts.target)
    fixed = parts.fixed(set(tcost.names))
    fixed = fixed if with_overhead else fixed.without_overhead()
    free = free_bits(target, fixed, joint.problem, what)
    alloc = solve(opts.strategy, joint.problem, joint.budget_bpw(free), max_types=opts.max_types)
    if alloc.bits_used > free:
        raise GemqError(f"the allocation uses {alloc.bits_used:.0f} bits, over the {free:.0f} the target leaves.",
                        "report this as a bug.")
    experts, tensors = joint.split(alloc)
    plan = plan_from_allocation(experts, list(shape.moe_layers), shape.n_experts)
    if isinstance(cache, dict):
        prune_cache(cache, plan)
    file = _whole_file_numbers(joint, alloc, fixed, target, what, opts)
    report.update(never_routed_experts=[f"L{l}.E{e}" for l, e in table.never_routed], cost_notes=table.notes,
                  tensor_cost_notes=tcost.notes, cost_seconds=table.seconds, cost_rows=rows)
    print_allocation(experts, report)
    log.info("whole file: %s; predicted %s", what, ", ".join(f"{k} {v}" for k, v in file.items()
                                                              if k in ("tensor_bits", "bound_bytes", "bpw")))
    plot_heatmap(experts, output.heatmap_path, tensors=tensors,
                 title=f"{model_dir.name}: gemq whole file, {opts.target.describe()} ({opts.granularity})")
    report["heatmap"] = str(output.heatmap_path)
    return ExpertTypes(plan=plan, origin=PlanOrigin(opts.strategy, opts.granularity, None, tuple(types)),
                       report={"allocation": report_dict(experts, report), "non_expert": tensor_section(tensors),
                               "whole_file": file},
                       imatrix=c.imatrix, quant_cache=writer_cache(c, store, cache), tensor_types=tensors.as_dict())


def _whole_file_numbers(joint: JointProblem, alloc: Allocation, fixed: FileBits, target: int, what: str,
                        opts: WholeFileOptions) -> dict[str, Any]:
    """The allocation's file-level numbers: what was asked, the bits it leaves and uses, predictions."""
    tensor_bits = alloc.bits_used + fixed.fixed_tensor_bits
    params = joint.problem.total_params + fixed.fixed_params
    out = {"target": what, "target_bits": target, "decided_bits": alloc.bits_used,
           "fixed_tensor_bits": fixed.fixed_tensor_bits, "overhead_bound_bits": fixed.overhead_bits,
           "tensor_bits": tensor_bits, "total_params": params, "bpw": tensor_bits / params,
           "predicted_loss_increase": alloc.total_cost, "solver": alloc.to_dict()["solver"]}
    if opts.target.size is not None:
        out["bound_bytes"] = int(np.ceil((tensor_bits + fixed.overhead_bits) / 8))
    return out
