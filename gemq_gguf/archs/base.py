"""The architecture adapter: where a Hugging Face MoE keeps its decoder layers, MoE blocks, routers and
experts, found from the model's own module tree rather than written per family.

llama.cpp's own converter (driven by `convert.hf_to_gguf`) handles metadata, vocabulary and tensor naming
for every architecture it knows. An adapter answers what GEMQ needs on top of that: which modules are the
routed experts and routers (calibration, costs, router tuning) and the MoE's shape (validation before any
heavy work). The default finds everything through transformers 5's experts interface (`experts.py`), so
a family whose blocks use it needs only a registration (`families.py`); a family that differs overrides
the one method that differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GemqError
from ..ggml.names import ROUTER, SHEXP_GATE
from .experts import ExpertsCall, ExpertsView, is_experts_module

#: config keys that give the number of experts a token uses, in the order families use them
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_k", "top_k", "num_selected_experts", "n_activated_experts",
              "top_k_experts")
#: child names of a shared-expert gate (a [1, hidden] linear whose sigmoid scales the shared expert)
SHEXP_GATE_NAMES = ("shared_expert_gate", "shared_experts_gate")


@dataclass(frozen=True)
class MoeShape:
    """What the converter and allocator need to know about a model's routed experts."""

    n_layers: int
    moe_layers: tuple[int, ...]
    n_experts: int
    top_k: int
    hidden: int
    expert_ffn: int
    projs: tuple[str, ...] = ("gate", "up", "down")  # ("up", "down") for experts without a gate


def meta_model(config: Any) -> nn.Module:
    """The model's module tree without weights (the meta device): structure and shapes for free."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


_SHAPES: dict[tuple[type, str, str], MoeShape] = {}


def _shape(adapter: ArchAdapter, config: Any) -> MoeShape:
    """The MoE shape from the meta-device module tree, cached by the config's content (a config may
    hold values JSON cannot carry back, e.g. Granite-hybrid's infinite `time_step_limit`, so the
    tree is built from the config object itself)."""
    key = (type(adapter), type(config).__name__, config.to_json_string(use_diff=False))
    if key not in _SHAPES:
        _SHAPES[key] = _measure_shape(adapter, config)
    return _SHAPES[key]


def _measure_shape(adapter: ArchAdapter, config: Any) -> MoeShape:
    model = meta_model(config)
    layers = adapter.decoder_layers(model)
    blocks = {l: adapter.block_of(m) for l, m in enumerate(layers)}
    moe = tuple(l for l, b in blocks.items() if b is not None)
    if not moe:
        raise GemqError(f"{type(config).__name__} has no routed-expert layers (a dense model).",
                        "gemq-gguf quantizes Mixture-of-Experts models; use llama-quantize for dense ones.")
    views = {l: adapter.experts(blocks[l]) for l in moe}
    kinds = {(v.n_experts, v.hidden, v.ffn, v.projs) for v in views.values()}
    if len(kinds) != 1:
        raise GemqError(f"the MoE layers of {type(config).__name__} differ in shape ({sorted(kinds)}).",
                        "such models are not supported yet; please report the model.")
    v = views[moe[0]]
    return MoeShape(n_layers=len(layers), moe_layers=moe, n_experts=v.n_experts, top_k=adapter.top_k(config),
                    hidden=v.hidden, expert_ffn=v.ffn, projs=v.projs)


class ArchAdapter:
    """Base adapter: the module tree of a transformers-5 MoE; subclasses override what differs."""

    hf_classes: ClassVar[tuple[str, ...]] = ()
    name: ClassVar[str] = ""  # the family, as reports name it
    #: llama.cpp's loader for this architecture requires output.weight (no fallback to token_embd), so a
    #: checkpoint with tied embeddings must have its embedding written as the output matrix too
    needs_output_tensor: ClassVar[bool] = False
    #: the checkpoint's tokenizer is its own Python code (no transformers class reads its files), which
    #: llama.cpp's converter runs: such a family converts only with --trust-remote-code
    tokenizer_is_code: ClassVar[bool] = False

    def moe_shape(self, config: Any) -> MoeShape:
        """Layers, experts and widths, read from the module tree built on the meta device (no weights)."""
        return _shape(self, config)

    def top_k(self, config: Any) -> int:
        for key in TOP_K_KEYS:
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        raise GemqError(f"{type(config).__name__} names no experts-per-token count ({', '.join(TOP_K_KEYS)}).",
                        "check config.json; this family needs an adapter that says where its top-k is.")

    def converter_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        """config.json keys llama.cpp's converter needs that a checkpoint saved by transformers may lack
        (transformers drops keys its config class does not define); merged over `hparams`, before the
        converter class is picked from `architectures` (which a re-save may name differently)."""
        return {}

    def converter_tensor_names(self, names: list[str]) -> dict[str, str]:
        """Checkpoint tensor names that a re-save by transformers writes differently from the released
        checkpoint, mapped to the names llama.cpp's converter knows (old -> new)."""
        return {}

    # -- the module tree ---------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's decoder layers, in order (what layer-streamed calibration walks through)."""
        return model.model.layers

    def block_of(self, layer_module: nn.Module) -> nn.Module | None:
        """The MoE block inside one decoder layer module (the parent of its experts), None for a dense layer."""
        for m in layer_module.modules():
            if any(is_experts_module(c) for c in m.children()):
                return m
        return None

    def moe_block(self, model: nn.Module, layer: int) -> nn.Module:
        block = self.block_of(self.decoder_layers(model)[layer])
        if block is None:
            raise ValueError(f"layer {layer} has no MoE block")
        return block

    def experts_module(self, block: nn.Module) -> nn.Module:
        """The module the block calls as `experts(hidden_states, top_k_index, top_k_weights)`: hooks on it see
        the routing exactly as the model computes it."""
        return next(c for c in block.children() if is_experts_module(c))

    def experts(self, block: nn.Module) -> ExpertsView:
        return ExpertsView(self.experts_module(block))

    def hook_experts(self, block: nn.Module, on_call: Callable[[ExpertsCall], None],
                     on_out: Callable[[torch.Tensor], None]) -> list[Any]:
        """Hooks (handles returned) that report each experts call as the model makes it, then the tensor
        [T, H] whose gradient is the gradient at the experts' summed output."""
        module = self.experts_module(block)
        return [module.register_forward_pre_hook(lambda m, args, kwargs: on_call(ExpertsCall.from_hook(args, kwargs)),
                                                 with_kwargs=True),
                module.register_forward_hook(lambda m, args, out: on_out(out[0] if isinstance(out, tuple) else out))]

    def router(self, block: nn.Module) -> nn.Module:
        """The block's router: the child whose weight is [n_experts, hidden]."""
        v = self.experts(block)
        for c in block.children():
            w = getattr(c, "weight", None)
            if isinstance(w, nn.Parameter) and tuple(w.shape) == (v.n_experts, v.hidden):
                return c
        raise ValueError(f"{type(block).__name__} has no [n_experts, hidden] router")

    # -- routers (tuning) --------------------------------------------------------------------------
    def router_input_module(self, block: nn.Module) -> nn.Module:
        """The module whose call's first argument is the router's input (what `router_logits` takes): the
        block itself where the router reads the block's input, the router where it reads something else
        (Gemma 4: the residual, while the block is the whole decoder layer)."""
        return block

    def router_params(self, block: nn.Module) -> dict[str, nn.Parameter]:
        """Trainable router tensors keyed by their GGUF name suffix (`ffn_gate_inp`, `ffn_gate_inp_shexp`)."""
        params = {ROUTER: self.router(block).weight}
        for name in SHEXP_GATE_NAMES:
            gate = getattr(block, name, None)
            if gate is not None:
                params[SHEXP_GATE] = gate.weight
        return params

    def router_logits(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Router logits [T, n_experts] of the router's input x (`router_input_module`), differentiable in
        the router weight: the routing-match loss compares their softmax with full precision's."""
        r = self.router(block)
        bias = getattr(r, "bias", None)
        return F.linear(x.reshape(-1, x.shape[-1]).to(r.weight.dtype), r.weight,
                        bias if isinstance(bias, torch.Tensor) else None)
