"""`--progressive K`: reach the target budget in K allocations, each measured on the model the previous
one produced (DESIGN.md §6).

Step i allocates at budget b_i (linearly from min(target + 1, highest reachable) down to the target),
quantizes the experts to that plan and tunes the routers against them. The next step's costs are then
measured in that context: calibration statistics (block inputs, gradients, routing) come from a pass
of the quantized-and-tuned model, while the cost of a candidate type is still the change from the
full-precision expert (the experts are restored from the float GGUF, which is what the writer
quantizes). The routers keep their tuning from step to step; the last step's tuning ships.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from torch import nn

from .allocate import Allocation, AllocationProblem, solve
from .archs import EXPERT_PROJS, ArchAdapter
from .errors import GemqError
from .imatrix_io import expert_tensor_name
from .plan import plan_from_units
from .router_ft import quantize_experts_, teacher_pass, tune_quantized
from .writer import QuantCache

if TYPE_CHECKING:
    from .pipeline import ConvertOptions, Source

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
        block = adapter.moe_block(model, l)
        data = {p: _float(tensors[expert_tensor_name(l, p)]) for p in EXPERT_PROJS}
        for e in range(shape.n_experts):
            adapter.set_expert_weights(block, e, {p: torch.from_numpy(np.array(data[p][e], dtype=np.float32))
                                                  for p in EXPERT_PROJS})


def _float(t: Any) -> np.ndarray:
    if t.tensor_type == GGMLQuantizationType.BF16:
        return (t.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return t.data


def _step_record(budget: float, alloc: Allocation, tuning: dict[str, Any]) -> dict[str, Any]:
    """One step of the JSON report: the allocation's summary and how the tuning judged it (held out)."""
    return {"budget": budget, "bpw": alloc.bpw, "predicted_loss_increase": alloc.total_cost,
            "unit_type_counts": dict(sorted(Counter(alloc.choice).items())), "heldout": tuning["heldout"],
            "routing_shift": {k: tuning["routing_shift"][k] for k in ("mean_before", "mean_after")}}


def progressive_allocation(opts: ConvertOptions, src: Source, model: nn.Module, tokens: torch.Tensor,
                           imatrix: dict[str, np.ndarray], problem: AllocationProblem,
                           cache: QuantCache) -> tuple[Allocation, dict[str, Any]]:
    """The final allocation and the meta the writer and report need (`_routers`, `router_tuning`,
    `progressive`: one record per step). `problem` holds the full-precision costs of step 1."""
    from .costs import estimate_costs
    from .stats import collect_stats

    budgets = step_budgets(float(opts.budget), problem.bpw_range()[1], opts.progressive)  # type: ignore[arg-type]
    adapter, n_experts = src.adapter, src.shape.n_experts
    teacher = teacher_pass(model, adapter, tokens, progress=True)
    steps: list[dict[str, Any]] = []
    for i, budget in enumerate(budgets):
        log.info("progressive step %d/%d: %.4f bpw", i + 1, len(budgets), budget)
        if i > 0:
            stats = collect_stats(model, adapter, tokens, progress=True, work_dir=src.float_gguf.parent,
                                  labels=opts.fisher, seed=opts.seed + i)
            restore_experts_(model, adapter, src.float_gguf)
            problem = estimate_costs(model, adapter, stats, imatrix, types=problem.types,
                                     granularity=opts.granularity, cache=cache, progress=True).problem()
            del stats
        alloc = solve(opts.strategy, problem, budget, max_types=opts.max_types)
        plan = plan_from_units(alloc.to_dict()["units"], list(src.shape.moe_layers), n_experts)
        quantize_experts_(model, adapter, plan, imatrix, cache)
        routers, tuning = tune_quantized(model, adapter, tokens, teacher, loss=opts.ft_loss, seed=opts.seed,
                                         lr=opts.ft_lr, epochs=opts.ft_epochs, select=opts.ft_select)
        steps.append(_step_record(budget, alloc, tuning))
    return alloc, {"_routers": routers, "router_tuning": tuning, "progressive": steps}
