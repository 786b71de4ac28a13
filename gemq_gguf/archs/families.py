"""The supported MoE families: one registration each (Hugging Face classes -> llama.cpp architecture),
plus an override where a family's semantics differ from what `base.ArchAdapter` finds on its own.

Adding a family: register it here, add a tiny config to tests/tiny_models.py, and run the family tests
(tests/test_families.py); docs/families.md says what each family needed.
"""
from __future__ import annotations

from .base import ArchAdapter
from .registry import register


@register
class Mixtral(ArchAdapter):
    hf_classes = ("MixtralForCausalLM",)
    name = "mixtral"


@register
class Qwen2Moe(ArchAdapter):
    """Qwen1.5/2-MoE: a shared expert behind a sigmoid gate; dense layers by `mlp_only_layers`."""

    hf_classes = ("Qwen2MoeForCausalLM",)
    name = "qwen2moe"
    needs_output_tensor = True  # src/models/qwen2moe.cpp


@register
class Qwen3Moe(ArchAdapter):
    hf_classes = ("Qwen3MoeForCausalLM",)
    name = "qwen3moe"


@register
class Olmoe(ArchAdapter):
    hf_classes = ("OlmoeForCausalLM",)
    name = "olmoe"
    needs_output_tensor = True  # src/models/olmoe.cpp


@register
class DeepseekV2(ArchAdapter):
    """DeepSeek-V2 / V2-Lite: MLA attention, shared experts, the first k layers dense."""

    hf_classes = ("DeepseekV2ForCausalLM",)
    name = "deepseek2"
