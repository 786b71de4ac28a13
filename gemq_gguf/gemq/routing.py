"""What the routers chose: every MoE block's routing recorded per forward (expert ids, router logits),
and the share of full-precision choices a quantized model no longer makes. Router tuning's losses and
judging read these (router_ft.py, router_stream.py), as do the benchmarks of the routing's share of the KLD.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..archs import ArchAdapter, ExpertsCall, ExpertsView
from .hooks import experts_hooks, router_input_hooks


@dataclass
class Routes:
    """Per MoE layer and forward call: selected expert ids [T, k] (CPU, int64) and, when asked, the
    router logits [T, n_experts] (centered, CPU float16 when recorded without grad; live tensors with)."""

    ids: dict[int, list[torch.Tensor]]
    logits: dict[int, list[torch.Tensor]]


@contextlib.contextmanager
def record_routing(model: nn.Module, adapter: ArchAdapter, *, logits: bool = False,
                   grad: bool = False) -> Iterator[Routes]:
    """Hook every MoE block and record its routing per forward, in call order: the expert ids as the
    model's experts call receives them, and router logits of the router's input.

    `grad=True` keeps the router logits on the device and in the autograd graph (for the routing-match
    loss) and skips the ids."""
    shape = adapter.moe_shape(model.config)
    out = Routes({l: [] for l in shape.moe_layers}, {l: [] for l in shape.moe_layers})

    def logits_hook(layer: int, block: nn.Module) -> Callable[[torch.Tensor], None]:
        def f(x: torch.Tensor) -> None:
            if grad:
                out.logits[layer].append(adapter.router_logits(block, x).float())
                return
            with torch.no_grad():
                z = adapter.router_logits(block, x.detach()).float()
                out.logits[layer].append((z - z.mean(-1, keepdim=True)).half().cpu())
        return f

    def ids_hook(layer: int, view: ExpertsView) -> Callable[[ExpertsCall, torch.Tensor], None]:
        return lambda call, output: out.ids[layer].append(call.ids.detach().cpu())
    with contextlib.ExitStack() as stack:
        if grad or logits:
            stack.enter_context(router_input_hooks(model, adapter, logits_hook))
        if not grad:
            stack.enter_context(experts_hooks(model, adapter, ids_hook))
        yield out


def routing_shift(fp_ids: dict[int, torch.Tensor], q_ids: dict[int, torch.Tensor]) -> dict[int, float]:
    """Per layer, the share of (token, slot) expert choices of full precision that the quantized model
    does not make (the top-k as a set: a swap of slot order is no shift)."""
    shift = {}
    for l, fp in fp_ids.items():
        q = q_ids[l]
        if fp.shape != q.shape:
            raise ValueError(f"layer {l}: routing shapes differ {tuple(fp.shape)} vs {tuple(q.shape)}")
        kept = (fp.unsqueeze(-1) == q.unsqueeze(-2)).any(-1)
        shift[l] = float(1.0 - kept.float().mean())
    return shift
