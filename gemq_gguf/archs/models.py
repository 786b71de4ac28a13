"""Adapters for the supported MoE architectures (one class each, registered by HF class name)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import ArchAdapter, register


@register
class Mixtral(ArchAdapter):
    hf_classes = ("MixtralForCausalLM",)
    name = "mixtral"
    n_experts_key = "num_local_experts"
    expert_ffn_key = "intermediate_size"


@register
class Qwen2Moe(ArchAdapter):
    """Qwen1.5/2-MoE: a shared expert behind a sigmoid gate, added to the routed experts."""

    hf_classes = ("Qwen2MoeForCausalLM",)
    name = "qwen2moe"
    has_shared_expert = True

    def is_moe_layer(self, config: Any, layer: int) -> bool:
        sparse_step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        return layer not in (getattr(config, "mlp_only_layers", None) or []) and (layer + 1) % sparse_step == 0

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)

    def router_params(self, block: nn.Module) -> dict[str, nn.Parameter]:
        return {"ffn_gate_inp": block.gate.weight, "ffn_gate_inp_shexp": block.shared_expert_gate.weight}


@register
class Qwen3Moe(Qwen2Moe):
    hf_classes = ("Qwen3MoeForCausalLM",)
    name = "qwen3moe"
    has_shared_expert = False

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> None:
        return None

    def router_params(self, block: nn.Module) -> dict[str, nn.Parameter]:
        return {"ffn_gate_inp": block.gate.weight}


@register
class Olmoe(ArchAdapter):
    hf_classes = ("OlmoeForCausalLM",)
    name = "olmoe"
    expert_ffn_key = "intermediate_size"


@register
class DeepseekV2(ArchAdapter):
    """DeepSeek-V2 / V2-Lite: MLA attention, shared experts, the first k layers dense."""

    hf_classes = ("DeepseekV2ForCausalLM",)
    name = "deepseek2"
    n_experts_key = "n_routed_experts"
    has_shared_expert = True

    def is_moe_layer(self, config: Any, layer: int) -> bool:
        return layer >= int(getattr(config, "first_k_dense_replace", 0) or 0)

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return block.shared_experts(x)
