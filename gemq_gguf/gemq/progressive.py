"""`--progressive K`: reach the target budget in K allocations, each measured on the model the previous
one produced.

Step i allocates at budget b_i (linearly from min(target + 1, highest reachable) down to the target),
quantizes the experts to that plan and tunes the routers against them. The next step's costs are then
measured in that context: calibration statistics (block inputs, gradients, routing) come from a pass
of the quantized-and-tuned model, while the cost of a candidate type is still the change from the
full-precision expert (the experts are restored from the float GGUF, which is what the writer
quantizes; layer-streamed, `router_stream.streamed_measure`, they are read from the shards). The routers keep their tuning from step to step; a step whose tuning does not beat the
routers it started from keeps those, and the routers of the last step that was kept ship.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from torch import nn

from ..allocate import Allocation, AllocationProblem, solve
from ..archs import ArchAdapter, MoeShape
from ..errors import GemqError
from ..ggml.names import expert_tensor_name
from ..ggml.quant import widen_bf16
from ..options import AllocOptions, CalibOptions, TuneOptions
from ..plan import plan_from_allocation
from .costs import estimate_costs
from .router_ft import ModelRunner, Runner, RouterTuning, tune_quantized
from .stats import collect_stats

log = logging.getLogger("gemq")


def step_budgets(target: float, highest: float, k: int) -> list[float]:
    """K budgets from min(target + 1, highest) down to the target (just the target when K = 1)."""
    if k < 1:
        raise GemqError(f"--progressive {k}: the number of steps must be at least 1.", "use e.g. --progressive 3.")
    return np.linspace(min(target + 1.0, highest), target, k).tolist() if k > 1 else [target]


def restore_experts_(model: nn.Module, adapter: ArchAdapter, float_gguf: Path) -> None:
    """Put the full-precision expert weights back, read from the float GGUF (memory-mapped)."""
    tensors = {t.name: t for t in GGUFReader(float_gguf).tensors}
    shape = adapter.moe_shape(model.config)
    for l in shape.moe_layers:
        view = adapter.experts(adapter.moe_block(model, l))
        data = {p: _float(tensors[expert_tensor_name(l, p)]) for p in view.projs}
        for e in range(shape.n_experts):
            view.set_weights(e, {p: torch.from_numpy(np.array(data[p][e], dtype=np.float32)) for p in view.projs})


def _float(t: Any) -> np.ndarray:
    return widen_bf16(t.data) if t.tensor_type == GGMLQuantizationType.BF16 else t.data


def _step_record(budget: float, alloc: Allocation, tuning: RouterTuning) -> dict[str, Any]:
    """One step of the JSON report: the allocation's summary and how the tuning judged it (held out)."""
    return {"budget": budget, "bpw": alloc.bpw, "predicted_loss_increase": alloc.total_cost,
            "unit_type_counts": dict(sorted(Counter(alloc.choice).items())), "heldout": tuning.report["heldout"],
            "routing_shift": {k: tuning.report["routing_shift"][k] for k in ("mean_before", "mean_after")},
            "routers_kept": tuning.report["routers_shipped"]}


@dataclass
class ProgressiveResult:
    """The last step's allocation, the routers as the steps left them (None: no step's tuning was
    kept), and one report record per step."""

    allocation: Allocation
    tuning: RouterTuning
    steps: list[dict[str, Any]]


#: step i's costs (i >= 1), measured on the model as the runner holds it after step i - 1
Measure = Callable[[int], AllocationProblem]


def whole_model_measure(runner: ModelRunner, float_gguf: Path, tokens: torch.Tensor, types: list[str],
                        alloc_opts: AllocOptions, calib: CalibOptions) -> Measure:
    """The in-memory re-measurement: statistics of the quantized-and-tuned model, then the costs with the
    experts restored to full precision from the float GGUF (the next step quantizes those)."""
    def measure(step: int) -> AllocationProblem:
        model, adapter = runner.model, runner.adapter
        stats = collect_stats(model, adapter, tokens, progress=True, work_dir=float_gguf.parent,
                              labels=calib.fisher, seed=calib.seed + step)
        restore_experts_(model, adapter, float_gguf)
        return estimate_costs(model, adapter, stats, runner.imatrix, types=types, granularity=alloc_opts.granularity,
                              cache=runner.cache, progress=True, rows=alloc_opts.cost_rows).problem()
    return measure


def progressive_allocation(runner: Runner, shape: MoeShape, tokens: torch.Tensor, problem: AllocationProblem,
                           measure: Measure, alloc_opts: AllocOptions, tune: TuneOptions,
                           calib: CalibOptions) -> ProgressiveResult:
    """Reach `alloc_opts.budget` in `tune.progressive` steps; `problem` holds the full-precision costs of step 1,
    `measure` gives the later steps' (`whole_model_measure`, or `router_stream.streamed_measure`)."""
    budgets = step_budgets(alloc_opts.budget, problem.bpw_range()[1], tune.progressive)
    teacher = runner.teacher_pass(tokens, progress=True)
    steps: list[dict[str, Any]] = []
    shipped: dict[str, np.ndarray] | None = None  # the float32 masters of the last step whose tuning was kept
    for i, budget in enumerate(budgets):
        log.info("progressive step %d/%d: %.4f bpw", i + 1, len(budgets), budget)
        if i > 0:
            problem = measure(i)
        alloc = solve(alloc_opts.strategy, problem, budget, max_types=alloc_opts.max_types)
        runner.quantize(plan_from_allocation(alloc, list(shape.moe_layers), shape.n_experts))
        tuning = tune_quantized(runner, tokens, teacher, tune, seed=calib.seed)
        shipped = tuning.routers if tuning.routers is not None else shipped
        steps.append(_step_record(budget, alloc, tuning))
    return ProgressiveResult(alloc, RouterTuning(shipped, tuning.report), steps)
