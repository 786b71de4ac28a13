"""Model plumbing shared by calibration and router tuning: freezing parameters, and hooks on every MoE block."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..archs import ArchAdapter, ExpertsCall, ExpertsView

BlockHook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]


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


@contextlib.contextmanager
def moe_block_hooks(model: nn.Module, adapter: ArchAdapter, make_hook: Callable[[int], BlockHook]) -> Iterator[None]:
    """`make_hook(layer)` as a forward hook (with kwargs) on every MoE block, removed afterwards."""
    shape = adapter.moe_shape(model.config)
    handles = [adapter.moe_block(model, l).register_forward_hook(make_hook(l), with_kwargs=True)
               for l in shape.moe_layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def block_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a MoE block was called with."""
    return args[0] if args else kwargs["hidden_states"]


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
