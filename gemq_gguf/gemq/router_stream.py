"""Router tuning and `--progressive`'s re-measurement on a layer-streamed model (`--calib-memory stream`):
the passes of `router_ft.py` on the engine of `layer_pass.py`, one decoder layer's weights at a time.

- Teacher pass: forward layer by layer over all batches of the full-precision checkpoint, routing
  recorded by the same hooks as in memory (`record_routing`), then the head's top-K log-probs and CE.
- The student (`Student`): whenever a decoder layer is materialised, its experts become ggml's round
  trip of their planned type (read from the QuantCache when there, else quantized) and its routers take
  the current tuned values. The routers live outside the layer source (float32, by GGUF name), so they
  survive every drop; the checkpoint's own values are taken at a layer's first load.
- Training step (the same batches and AdamW step as in memory): forward layer by layer for the batch, the
  LM loss (kd / ce) at the head and its gradient at the last boundary, then backward from the top,
  recomputing each layer from its saved input. The `route` term is per layer (it depends on that layer's
  router logits only): in the recomputation the hooks record the layer's router logits, and
  ROUTE_WEIGHT / n_moe_layers · route_l is pushed back with the boundary gradient, which sums to the
  in-memory loss ROUTE_WEIGHT · mean_l(route_l). The hooks fire once per layer per step (in the
  recomputation only); the routers' gradients are read before the layer is dropped.
- Held-out score: forward with routing recorded, head without gradients.
- Progressive re-measurement: `stream_stats` on the student; the costs with the full-precision experts
  read from the shards (`streamed_costs` on the plain source).

I/O cost: every training step reads every layer twice (forward and recomputation) plus the embeddings
and the head once; the teacher pass and each held-out score read every layer once. So `--ft-epochs 2`
over 56 training sequences in batches of 4 (28 steps) reads the model about 60 times: streaming trades
memory for reads (and re-quantizes each layer's experts on every load when their bytes are not cached).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..allocate import AllocationProblem
from ..archs import ArchAdapter
from ..ggml.names import router_tensor_name
from ..ggml.quant import QuantCache
from ..options import AllocOptions, CalibOptions
from ..plan import ExpertPlan
from .layer_pass import DEFAULT_BOUNDARY_LIMIT, LayerPass, Transformed, progress_bar
from .layer_source import LayerSource
from .progressive import Measure
from .router_ft import (ROUTE_WEIGHT, Score, Teacher, TEACHER_TOP_K, lm_loss, quantize_block_, route_loss, score_batch,
                        score_from, teacher_batch, teacher_from)
from .routing import Routes, record_routing
from .streaming import stream_stats, streamed_costs


class Student:
    """What every materialised decoder layer becomes: experts quantized per `plan` (None: full precision),
    routers set to `routers` (float32 by GGUF name; a layer's checkpoint values are taken on its first
    load), trainable while `train`."""

    def __init__(self, model: nn.Module, adapter: ArchAdapter, imatrix: dict[str, np.ndarray] | None,
                 cache: QuantCache | None) -> None:
        self.model, self.adapter, self.imatrix, self.cache = model, adapter, imatrix, cache
        self.shape = adapter.moe_shape(model.config)
        self.plan: ExpertPlan | None = None
        self.routers: dict[str, torch.Tensor] = {}
        self.train = False

    def params(self, layer: int) -> dict[str, nn.Parameter]:
        """The router parameters of MoE layer `layer` (materialised), by GGUF name."""
        block = self.adapter.moe_block(self.model, layer)
        return {router_tensor_name(layer, suffix): p for suffix, p in self.adapter.router_params(block).items()}

    def __call__(self, index: int, layer: nn.Module) -> None:
        if index not in self.shape.moe_layers:
            return
        if self.plan is not None:
            quantize_block_(self.adapter, self.adapter.moe_block(self.model, index), index, self.shape.n_experts,
                            self.plan, self.imatrix, self.cache)
        for name, p in self.params(index).items():
            if name in self.routers:
                with torch.no_grad():
                    p.copy_(self.routers[name])
            else:
                self.routers[name] = p.detach().float().clone()
            p.requires_grad_(self.train)


class StreamedRunner:
    """Router tuning (`router_ft.Runner`) on the model of `source`, one decoder layer's weights at a time."""

    def __init__(self, source: LayerSource, adapter: ArchAdapter, imatrix: dict[str, np.ndarray] | None = None,
                 cache: QuantCache | None = None, boundary_limit: int = DEFAULT_BOUNDARY_LIMIT,
                 work_dir: Path | None = None) -> None:
        self.source, self.adapter = source, adapter
        self.student = Student(source.model, adapter, imatrix, cache)
        self.student_source = Transformed(source, self.student)
        self.boundary_limit, self.work_dir = boundary_limit, work_dir

    def _pass(self, source: LayerSource | Transformed, tokens: torch.Tensor, batch_size: int) -> LayerPass:
        lp = LayerPass(source, tokens, batch_size, self.boundary_limit, self.work_dir)
        lp.embed()
        return lp

    def _routed_forward(self, source: LayerSource | Transformed, tokens: torch.Tensor, batch_size: int,
                        progress: bool, desc: str) -> tuple[LayerPass, Routes]:
        """Embeddings and every layer without gradients, with the routing recorded (ids, centered logits)."""
        lp = self._pass(source, tokens, batch_size)
        bar = progress_bar(lp.n_layers, progress, desc)
        with record_routing(source.model, self.adapter, logits=True) as routes:
            lp.forward(bar.update)
        bar.close()
        return lp, routes

    def teacher_pass(self, tokens: torch.Tensor, progress: bool = False, top_k: int = TEACHER_TOP_K,
                     batch_size: int = 4) -> Teacher:
        """`router_ft.teacher_pass` on the full-precision checkpoint."""
        lp, routes = self._routed_forward(self.source, tokens, batch_size, progress, "teacher (layer-streamed)")
        batches: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        lp.head(lambda s, logits: batches.append(teacher_batch(logits, lp.batch(s), top_k)), grad=False)
        return teacher_from(batches, routes, tokens.shape)

    def quantize(self, plan: ExpertPlan) -> None:
        """Every layer loaded from now on gets its experts quantized per `plan`."""
        self.student.plan = plan

    def score(self, tokens: torch.Tensor, teacher: Teacher, batch_size: int = 4) -> Score:
        """`router_ft.score` of the student."""
        lp, routes = self._routed_forward(self.student_source, tokens, batch_size, False, "")
        sums: list[tuple[float, float]] = []

        def head(s: int, logits: torch.Tensor) -> None:
            rows = slice(s, s + batch_size)  # the batch's teacher rows
            sums.append(score_batch(logits, lp.batch(s), teacher.logp[rows], teacher.idx[rows]))
        lp.head(head, grad=False)
        return score_from(sums, routes, teacher, tokens.shape)

    def routers(self) -> dict[str, torch.Tensor]:
        """The current router values; layers never loaded yet are read once for their checkpoint values."""
        for l in self.student.shape.moe_layers:
            if not set(self.student.params(l)) <= set(self.student.routers):
                with self.source.loaded(l):  # the checkpoint's values, no experts quantized for nothing
                    self.student.routers.update({n: p.detach().float().clone() for n, p in self.student.params(l).items()
                                                 if n not in self.student.routers})
        return {n: v.clone() for n, v in self.student.routers.items()}

    def set_routers(self, values: dict[str, torch.Tensor]) -> None:
        self.student.routers = {n: v.detach().float().clone() for n, v in values.items()}

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Routers trainable in the layers loaded meanwhile."""
        self.student.train = True
        try:
            yield
        finally:
            self.student.train = False

    def step(self, tokens: torch.Tensor, teacher: Teacher | None,
             loss: str) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """One batch's training loss and the routers' gradients, streamed (module docstring)."""
        parts = loss.split("+")
        lp = self._pass(self.student_source, tokens, len(tokens))
        lp.forward()
        lm: list[torch.Tensor] = []
        if parts == ["route"]:  # no LM term: nothing flows down from the head
            lm.append(torch.zeros((), device=self.source.device))
            grad = torch.zeros_like(lp.h[-1])
        else:
            grad = lp.head(lambda s, logits: lm.append(lm_loss(logits, tokens, teacher, parts)) or lm[-1], grad=True)
        assert grad is not None
        moe = list(self.student.shape.moe_layers)
        route: dict[int, torch.Tensor] = {}
        grads: dict[str, torch.Tensor | None] = {}

        @contextlib.contextmanager
        def harvest(i: int, layer: nn.Module) -> Iterator[None]:
            yield
            if i in moe:
                grads.update({n: None if p.grad is None else p.grad.float().clone()
                              for n, p in self.student.params(i).items()})

        def route_term(i: int) -> torch.Tensor | None:
            if i not in moe:
                return None
            assert teacher is not None
            (z,) = routes.logits[i]
            routes.logits[i].clear()
            term = route_loss({i: [z]}, teacher.router_logits)
            route[i] = term.detach()
            return term * (ROUTE_WEIGHT / len(moe))

        with record_routing(self.source.model, self.adapter, grad=True) if "route" in parts \
                else contextlib.nullcontext() as routes:
            lp.backward(grad, input_grad=False, around=harvest, extra=route_term if "route" in parts else None)
        value = lm[0]
        if "route" in parts:
            value = value + ROUTE_WEIGHT * torch.stack([route[l] for l in moe]).mean().to(value.device)
        return value.detach(), grads


def streamed_measure(runner: StreamedRunner, tokens: torch.Tensor, types: list[str], alloc_opts: AllocOptions,
                     calib: CalibOptions) -> Measure:
    """`--progressive`'s re-measurement, streamed: statistics of the student (quantized experts per the
    step's plan, tuned routers), then the costs against the full-precision experts of the shards (one
    layer held at a time)."""
    source, adapter = runner.source, runner.adapter

    def measure(step: int) -> AllocationProblem:
        stats = stream_stats(runner.student_source, adapter, tokens, progress=True, work_dir=runner.work_dir,
                             labels=calib.fisher, seed=calib.seed + step)
        return streamed_costs(source, adapter, stats, runner.student.imatrix or {}, types=types,
                              granularity=alloc_opts.granularity, cache=runner.student.cache, progress=True,
                              rows=alloc_opts.cost_rows).problem()
    return measure
