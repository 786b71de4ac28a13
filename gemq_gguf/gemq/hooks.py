"""Model plumbing shared by calibration and router tuning: freezing parameters, and hooks on every MoE block's
router input and experts call."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..archs import ArchAdapter, ExpertsCall, ExpertsView


@contextlib.contextmanager
def frozen(model: nn.Module, trainable: Iterable[nn.Parameter] = ()) -> Iterator[None]:
    """Every parameter but `trainable` frozen, and eval mode (no dropout, no router jitter: what
    llama.cpp runs); the previous flags and mode come back afterwards. Frozen weights get no gradients,
    which keeps backward memory at one batch's activations."""
    requires = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    model.eval()
    try:
        yield
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)


#: called with a MoE block's router input, during the forward
RouterInputHook = Callable[[torch.Tensor], None]


@contextlib.contextmanager
def router_input_hooks(model: nn.Module, adapter: ArchAdapter,
                       make_hook: Callable[[int, nn.Module], RouterInputHook]) -> Iterator[None]:
    """`make_hook(layer, block)` called with the router's input of every MoE block (the first argument of
    `adapter.router_input_module(block)`'s call), removed afterwards."""
    shape = adapter.moe_shape(model.config)
    handles = []
    for l in shape.moe_layers:
        block = adapter.moe_block(model, l)
        hook = make_hook(l, block)
        handles.append(adapter.router_input_module(block).register_forward_hook(
            lambda m, args, kwargs, out, hook=hook: hook(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


#: called with each experts call and its output, during the forward
ExpertsHook = Callable[[ExpertsCall, torch.Tensor], None]


@contextlib.contextmanager
def experts_hooks(model: nn.Module, adapter: ArchAdapter,
                  make_hook: Callable[[int, ExpertsView], ExpertsHook]) -> Iterator[None]:
    """`make_hook(layer, view)` on every MoE block's experts module: it sees the experts' input and the
    routing exactly as the model computes them (whatever the family's scoring), and their output."""
    shape = adapter.moe_shape(model.config)
    handles = []
    for l in shape.moe_layers:
        block = adapter.moe_block(model, l)
        hook = make_hook(l, adapter.experts(block))
        calls: list[ExpertsCall] = []
        handles += adapter.hook_experts(block, calls.append,
                                        lambda out, calls=calls, hook=hook: hook(calls.pop(), out))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
