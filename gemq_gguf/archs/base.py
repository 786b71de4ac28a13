"""The architecture adapter interface and its registry, keyed by Hugging Face class name.

llama.cpp's own converter (driven by `hf_to_gguf`) handles metadata, vocabulary and tensor naming for
every architecture it knows. An adapter only answers what GEMQ needs on top of that: which Hugging
Face modules are the routed experts, routers and shared experts (for calibration and router tuning),
and how the config describes the MoE (for validation before any heavy work starts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import GemqError


@dataclass(frozen=True)
class MoeShape:
    """What the converter and allocator need to know about a model's routed experts."""

    n_layers: int
    moe_layers: tuple[int, ...]
    n_experts: int
    top_k: int
    hidden: int
    expert_ffn: int


class ArchAdapter:
    """Base adapter; subclasses set the class attributes and override what differs."""

    hf_classes: ClassVar[tuple[str, ...]] = ()
    name: ClassVar[str] = ""
    n_experts_key: ClassVar[str] = "num_experts"
    expert_ffn_key: ClassVar[str] = "moe_intermediate_size"
    block_attr: ClassVar[str] = "mlp"
    has_shared_expert: ClassVar[bool] = False

    def moe_shape(self, config: Any) -> MoeShape:
        n_layers = int(config.num_hidden_layers)
        n_experts = int(getattr(config, self.n_experts_key, 0) or 0)
        if n_experts <= 1:
            raise GemqError(f"{type(config).__name__} describes a dense model ({self.n_experts_key} = {n_experts}).",
                            "gemq-gguf quantizes Mixture-of-Experts models; use llama-quantize for dense ones.")
        return MoeShape(n_layers=n_layers, moe_layers=tuple(l for l in range(n_layers) if self.is_moe_layer(config, l)),
                        n_experts=n_experts, top_k=int(config.num_experts_per_tok), hidden=int(config.hidden_size),
                        expert_ffn=int(getattr(config, self.expert_ffn_key)))

    def is_moe_layer(self, config: Any, layer: int) -> bool:
        return True

    # -- Hugging Face side (transformers 5: every MoE block has `gate` -> (logits, weights, ids) and
    # -- `experts` with stacked `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]).
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's decoder layers, in order (what layer-streamed calibration walks through)."""
        return model.model.layers

    def block_of(self, layer_module: nn.Module) -> nn.Module:
        """The MoE block inside one decoder layer module."""
        return getattr(layer_module, self.block_attr)

    def moe_block(self, model: nn.Module, layer: int) -> nn.Module:
        return self.block_of(self.decoder_layers(model)[layer])

    def router(self, block: nn.Module) -> nn.Module:
        return block.gate

    def route(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids [T, k], routing weights [T, k]) exactly as the model's block computes them."""
        _, weights, ids = block.gate(x.reshape(-1, x.shape[-1]))
        return ids, weights

    def router_logits(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Router logits [T, n_experts] (differentiable in the router weight): the routing-match loss
        compares their softmax with full precision's."""
        w = self.router(block).weight
        return torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).to(w.dtype), w)

    def expert_weights(self, block: nn.Module, expert: int) -> dict[str, torch.Tensor]:
        """One expert's matrices in [out, in] orientation, keyed gate / up / down."""
        gate, up = block.experts.gate_up_proj[expert].chunk(2, dim=0)
        return {"gate": gate, "up": up, "down": block.experts.down_proj[expert]}

    def set_expert_weights(self, block: nn.Module, expert: int, w: dict[str, torch.Tensor]) -> None:
        """Replace one expert's matrices in place (router tuning runs against quantized experts)."""
        with torch.no_grad():
            n = block.experts.gate_up_proj.shape[1] // 2
            block.experts.gate_up_proj[expert, :n].copy_(w["gate"])
            block.experts.gate_up_proj[expert, n:].copy_(w["up"])
            block.experts.down_proj[expert].copy_(w["down"])

    def expert_act(self, block: nn.Module):
        return block.experts.act_fn

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The shared-expert contribution to the block output (None when the architecture has none)."""
        return None

    def router_params(self, block: nn.Module) -> dict[str, nn.Parameter]:
        """Trainable router tensors keyed by their GGUF name suffix (`ffn_gate_inp`, ...)."""
        return {"ffn_gate_inp": block.gate.weight}


_REGISTRY: dict[str, ArchAdapter] = {}


def register(cls: type[ArchAdapter]) -> type[ArchAdapter]:
    """Class decorator: make an adapter available for each of its Hugging Face class names."""
    for hf in cls.hf_classes:
        _REGISTRY[hf] = cls()
    return cls


def supported() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(architectures: list[str] | None) -> ArchAdapter:
    """The adapter for a config's `architectures` list, or a clear error listing what is supported."""
    for a in architectures or []:
        if a in _REGISTRY:
            return _REGISTRY[a]
    names = ", ".join(architectures or ["(none)"])
    if any(not a.endswith("ForCausalLM") for a in architectures or []) and architectures:
        raise GemqError(f"{names} is not a causal language model.",
                        f"convert a *ForCausalLM checkpoint; supported: {', '.join(supported())}.")
    raise GemqError(f"architecture {names} is not supported.", f"use one of: {', '.join(supported())}.")
