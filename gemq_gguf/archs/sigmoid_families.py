"""The families routed DeepSeek-V3's way: sigmoid expert scores (often with a selection bias and group-limited
top-k), which llama.cpp's converter writes only when config.json says `scoring_func: sigmoid`, plus the DeepSeek
lineage's dense first layers (`first_k_dense_replace`). One registration each, as in `families.py`.
"""
from __future__ import annotations

import re
from typing import Any

from ..errors import GemqError
from torch import nn

from .base import ArchAdapter, MoeShape
from .experts import ExpertsView, Layout
from .registry import register


def leading_dense(hparams: dict[str, Any]) -> dict[str, Any]:
    """`first_k_dense_replace` from transformers 5's `mlp_layer_types` (the converter reads only the former;
    without it llama.cpp looks for a router in the dense first layers)."""
    types = hparams.get("mlp_layer_types")
    if "first_k_dense_replace" in hparams or not types:
        return {}
    return {"first_k_dense_replace": next((i for i, t in enumerate(types) if t != "dense"), len(types))}


class SigmoidScores(ArchAdapter):
    """Families whose transformers class always scores experts with a sigmoid: llama.cpp's converter writes
    sigmoid gating only when config.json says `scoring_func: sigmoid`, a key the released checkpoints have
    and a re-save by transformers drops (without it the GGUF silently routes by softmax)."""

    def converter_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        return {} if "scoring_func" in hparams else {"scoring_func": "sigmoid"}


@register
class DeepseekV3(SigmoidScores):
    """DeepSeek-V3 / R1 and Kimi-K2: sigmoid scores, a score-correction bias and group-limited top-k that
    pick the experts, `routed_scaling_factor` on their weights (all read from the experts call)."""

    hf_classes = ("DeepseekV3ForCausalLM",)
    name = "deepseek3"


@register
class MiniMaxM2(SigmoidScores):
    """MiniMax-M2: sigmoid scores with a score-correction bias, partial rotary attention."""

    hf_classes = ("MiniMaxM2ForCausalLM",)
    name = "minimax-m2"

    def converter_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        extra = super().converter_hparams(hparams)
        if "rotary_dim" not in hparams:  # the converter reads the rotary width only from this key
            head_dim = hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]
            rope = hparams.get("rope_parameters") or {}
            extra["rotary_dim"] = int(head_dim * rope.get("partial_rotary_factor", hparams.get("partial_rotary_factor", 1.0)))
        return extra


@register
class MiniMaxM3(MiniMaxM2):
    """MiniMax-M3 (text model of `MiniMaxM3SparseForConditionalGeneration`): MiniMax-M2's routing, a shared
    expert, dense first layers, clamped SwiGLU ("swigluoai", read from the experts module) and block-sparse
    attention with an indexer in the MoE layers."""

    hf_classes = ("MiniMaxM3SparseForConditionalGeneration", "MiniMaxM3VLForCausalLM")
    name = "minimax-m3"

    def moe_shape(self, config: Any) -> MoeShape:
        # transformers 5.24 rotates `head_dim * partial_rotary_factor` dims and ignores `rotary_dim`, which is what
        # the converter writes: where they disagree the GGUF computes another model than the one GEMQ calibrates
        rotated = int(config.head_dim * (config.rope_parameters or {}).get("partial_rotary_factor", 1.0))
        if rotated != config.rotary_dim:
            raise GemqError(f"MiniMax-M3 with rotary_dim {config.rotary_dim} and a rope over {rotated} of "
                            f"{config.head_dim} dims: transformers rotates the latter, llama.cpp's converter writes "
                            "the former, so the GGUF would compute another model than the one GEMQ calibrates.",
                            f"set rope_parameters.partial_rotary_factor to {config.rotary_dim / config.head_dim} "
                            "in the text config.")
        # llama.cpp's graph (src/models/minimax-m3.cpp): dense layers first, sized as the experts, and the sparse
        # attention in exactly the MoE layers
        mlp, attn = list(config.mlp_layer_types), list(config.layer_types)
        n_dense = next((i for i, t in enumerate(mlp) if t != "dense"), len(mlp))
        if mlp[n_dense:] != ["sparse"] * (len(mlp) - n_dense) or \
                attn != ["full_attention"] * n_dense + ["minimax_m3_sparse"] * (len(mlp) - n_dense) or \
                (n_dense and config.dense_intermediate_size != config.intermediate_size) or \
                config.shared_intermediate_size % config.intermediate_size:
            raise GemqError(f"MiniMax-M3 with MLP layers {mlp}, attention layers {attn}, dense/expert/shared widths "
                            f"{config.dense_intermediate_size}/{config.intermediate_size}/"
                            f"{config.shared_intermediate_size}: llama.cpp's graph takes the dense layers first and as "
                            "wide as an expert, the shared expert as whole experts and the sparse attention in every "
                            "MoE layer only.", "convert a checkpoint with that layout.")
        return super().moe_shape(config)

    def converter_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        # transformers' config flattens the released `sparse_attention_config` and `moe_layer_freq` into its own
        # keys and has no shared-expert count; the converter reads only the released ones
        extra = super().converter_hparams(hparams)
        if "sparse_attention_config" not in hparams:
            extra["sparse_attention_config"] = {
                "sparse_num_index_heads": hparams["index_n_heads"], "sparse_index_dim": hparams["index_head_dim"],
                "sparse_topk_blocks": hparams["index_topk_blocks"], "sparse_block_size": hparams["index_block_size"],
                "sparse_local_block": hparams["index_local_blocks"]}
        if "moe_layer_freq" not in hparams:
            extra["moe_layer_freq"] = [int(t == "sparse") for t in hparams["mlp_layer_types"]]
        if "n_shared_experts" not in hparams:
            extra["n_shared_experts"] = hparams["shared_intermediate_size"] // hparams["intermediate_size"]
        return extra


@register
class Glm5Next(SigmoidScores):
    """GLM-5.3-Flash (text model of `Glm5NextForConditionalGeneration`): KDA linear-attention layers and indexed
    nope-only MLA layers, hyper-connections, GLM-5's routing, a shared expert, dense first layers."""

    hf_classes = ("Glm5NextForConditionalGeneration", "Glm5NextTextForCausalLM")
    name = "glm5-next"

    def moe_shape(self, config: Any) -> MoeShape:
        if config.hc_mult != 4:  # src/models/glm5-next.cpp asserts it (the process aborts on load)
            raise GemqError(f"GLM-5.3-Flash with hc_mult {config.hc_mult}: llama.cpp's graph runs only 4 "
                            "hyper-connection streams.", "convert a checkpoint with hc_mult 4 (the released one).")
        return super().moe_shape(config)

    def converter_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        # transformers' config flattens the released `linear_attn_config`; the converter reads only that, and
        # `mla_use_nope` and `first_k_dense_replace`
        extra = {**super().converter_hparams(hparams), **leading_dense(hparams)}
        if "linear_attn_config" not in hparams:
            extra["linear_attn_config"] = {
                "num_heads": hparams["linear_num_heads"], "head_dim": hparams["linear_head_dim"],
                "short_conv_kernel_size": hparams["linear_conv_kernel_dim"],
                "gate_lower_bound": hparams["linear_lower_bound"]}
        extra.setdefault("mla_use_nope", hparams.get("mla_use_nope", hparams["qk_rope_head_dim"] == 0))
        return extra


@register
class Step3p7(SigmoidScores):
    """Step-3.7-Flash (text model of `Step3p7ForConditionalGeneration`): full and sliding-window attention layers
    with their own head counts and ropes, head-wise attention gates, sigmoid routing with a selection bias, a
    shared expert, dense first layers. Its experts module is outside transformers' experts interface (concatenated
    gate/up, [E, out, in]; its own clamped GLU, `_apply_gate`), so the layout is given here."""

    hf_classes = ("Step3p7ForConditionalGeneration", "Step3p7TextForCausalLM")
    name = "step35"
    _layout = Layout(has_gate=True, is_transposed=False, is_concatenated=True)

    def block_of(self, layer_module: nn.Module) -> nn.Module | None:
        return layer_module.mlp if hasattr(layer_module.mlp, "experts") else None

    def experts_module(self, block: nn.Module) -> nn.Module:
        return block.experts

    def experts(self, block: nn.Module) -> ExpertsView:
        return ExpertsView(block.experts, self._layout)

    def converter_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        # the converter reads the released config's keys, which transformers' config turns into its own
        types = hparams["layer_types"]
        rope = hparams.get("rope_parameters") or {}
        extra = {"num_attention_groups": hparams["num_key_value_heads"],
                 "moe_num_experts": hparams["n_routed_experts"], "moe_top_k": hparams["num_experts_per_tok"],
                 "norm_expert_weight": True,  # transformers' router always renormalises the top-k weights
                 "moe_layers_enum": ",".join(str(i) for i, t in enumerate(hparams["mlp_layer_types"]) if t == "sparse"),
                 "rope_theta": [rope[t]["rope_theta"] for t in types],
                 "partial_rotary_factors": [rope[t].get("partial_rotary_factor", 1.0) for t in types]}
        if "sliding_attention" in types:
            extra["attention_other_setting"] = {"num_attention_heads": hparams["num_sliding_attention_heads"],
                                                "num_attention_groups": hparams["num_key_value_heads"]}
        return {**super().converter_hparams(hparams), **{k: v for k, v in extra.items() if k not in hparams}}


@register
class Dots1(SigmoidScores):
    """dots.llm1: DeepSeek-V3's routing (sigmoid, bias, scaling), the first layers dense."""

    hf_classes = ("Dots1ForCausalLM",)
    name = "dots1"


@register
class Glm4MoeLite(SigmoidScores):
    """GLM-4.7-Flash: DeepSeek-V3's MLA attention and routing in GLM's layers."""

    hf_classes = ("Glm4MoeLiteForCausalLM",)
    name = "glm4moe-lite"

    def converter_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        return {**super().converter_hparams(hparams), **leading_dense(hparams)}


@register
class ExaoneMoe(SigmoidScores):
    """EXAONE-MoE (K-EXAONE): DeepSeek-V3-style sigmoid routing with a shared expert, sliding-window layers."""

    hf_classes = ("ExaoneMoeForCausalLM",)
    name = "exaone-moe"


@register
class SarvamMoe(SigmoidScores):
    """Sarvam-MoE (sarvam-30b): GLM-4.5's module tree in transformers (the checkpoint keeps Bailing-V2's tensor
    names, which transformers maps on load and back on save), llama.cpp's bailingmoe2 graph; full rotary."""

    hf_classes = ("SarvamMoEForCausalLM",)
    name = "sarvam-moe"

    def converter_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        # the converter reads the released config's names; transformers' config saves its own
        extra = super().converter_hparams(hparams)
        if "score_function" in hparams:
            extra.pop("scoring_func", None)
        released = {"num_experts": hparams.get("n_routed_experts"), "num_shared_experts": hparams.get("n_shared_experts")}
        extra.update({k: v for k, v in released.items() if k not in hparams and v is not None})
        return extra


@register
class KimiLinear(SigmoidScores):
    """Kimi Linear: Kimi Delta Attention (linear) and MLA layers without rope, DeepSeek-V3's routing (sigmoid,
    correction bias, scaling), a shared expert, the first layers dense."""

    hf_classes = ("KimiLinearForCausalLM",)
    name = "kimi-linear"

    def converter_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        # transformers 5 saves the layer kinds as `layer_types` / `mlp_layer_types` and the KDA sizes as
        # `linear_*`; the converter reads only the released checkpoint's keys
        extra = super().converter_hparams(hparams)
        extra.update(leading_dense(hparams))
        types = hparams.get("layer_types") or []
        if "linear_attn_config" not in hparams and types:
            extra["linear_attn_config"] = {
                "full_attn_layers": [i + 1 for i, t in enumerate(types) if t == "full_attention"],
                "kda_layers": [i + 1 for i, t in enumerate(types) if t != "full_attention"],
                "head_dim": hparams["linear_head_dim"], "num_heads": hparams["linear_num_heads"],
                "short_conv_kernel_size": hparams["linear_conv_kernel_dim"]}
        if "num_shared_experts" not in hparams:
            extra["num_shared_experts"] = hparams.get("n_shared_experts", 1)
        return extra

    def converter_tensor_names(self, names: list[str]) -> dict[str, str]:
        # transformers renames the checkpoint's `block_sparse_moe.` to `mlp.` on load and back on save, the
        # dense layers' MLP included; the converter knows those as `mlp.`
        dense = re.compile(r"(\.layers\.\d+\.)block_sparse_moe\.((gate|up|down)_proj\.weight)$")
        return {n: dense.sub(r"\1mlp.\2", n) for n in names if dense.search(n)}


@register
class MiMoV2Flash(SigmoidScores):
    """MiMo-V2-Flash: sliding-window layers with attention sinks and twice the KV heads, partial rotary
    attention with a base per layer kind, DeepSeek-V3's routing (sigmoid, correction bias), a dense first layer."""

    hf_classes = ("MiMoV2FlashForCausalLM",)
    name = "mimo2"

    def converter_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        # the converter reads the released checkpoint's keys, which transformers' config class renames or drops
        extra = super().converter_hparams(hparams)
        types, rope = hparams.get("layer_types") or [], dict(hparams.get("rope_parameters") or {})
        released = {"swa_head_dim": hparams["head_dim"], "swa_v_head_dim": hparams["v_head_dim"],
                    "swa_num_attention_heads": hparams["num_attention_heads"],
                    "swa_num_key_value_heads": 2 * hparams["num_key_value_heads"],  # transformers doubles them
                    "topk_method": "noaux_tc", "layernorm_epsilon": hparams.get("rms_norm_eps", 1e-5),
                    "hybrid_layer_pattern": [int(t == "sliding_attention") for t in types]}
        extra.update({k: v for k, v in released.items() if k not in hparams})
        full = rope.get("full_attention")
        if isinstance(full, dict) and "partial_rotary_factor" not in rope:  # read only at the top level
            extra["rope_parameters"] = {**rope, "partial_rotary_factor": full.get("partial_rotary_factor", 1.0)}
        return extra


@register
class DeepseekV32(SigmoidScores):
    """DeepSeek-V3.2: DeepSeek-V3 with DeepSeek sparse attention (a lightning indexer picks the keys)."""

    hf_classes = ("DeepseekV32ForCausalLM",)
    name = "deepseek32"


@register
class Dots3(SigmoidScores):
    """dots.llm3 (dots3-note, text): MLA with a sparse-attention indexer in the full layers and its own MLA
    sizes in the sliding-window layers, DeepSeek-V3's routing, a shared expert, dense first layers."""

    hf_classes = ("Dots3NoteForCausalLM", "Dots3NoteForConditionalGeneration")
    name = "dots3"

    def converter_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        # transformers 5 keeps the sliding-window layers' sizes in `per_layer_config` and the window in
        # `sliding_window`; the converter reads the released checkpoint's `swa_*` and `sliding_window_size`
        extra = {**super().converter_hparams(hparams), **leading_dense(hparams)}
        per_layer = hparams.get("per_layer_config") or {}
        types = hparams.get("layer_types") or []
        swa = next((per_layer[k] for k in per_layer if types[int(k)] == "sliding_attention"), {})
        sizes = ("num_attention_heads", "num_key_value_heads", "q_lora_rank", "kv_lora_rank", "head_dim",
                 "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")  # saved only where they differ
        extra.update({f"swa_{k}": swa.get(k, hparams.get(k)) for k in sizes if f"swa_{k}" not in hparams})
        if "sliding_window_size" not in hparams and hparams.get("sliding_window") is not None:
            extra["sliding_window_size"] = hparams["sliding_window"]
        # the converter counts the layers before it moves a wrapper's text_config to the top level (released
        # Dots3Note wrappers keep the text config there; transformers saves it nested)
        extra["num_hidden_layers"] = hparams["num_hidden_layers"]
        if "apply_mla_qkv_lora_rescale" not in hparams:  # transformers' class always rescales the Q/KV latents
            extra["apply_mla_qkv_lora_rescale"] = True
        rope = hparams.get("rope_parameters") or {}
        if "indexed_attention" in rope and "full_attention" not in rope:  # the converter's name for the full layers'
            extra["rope_parameters"] = {**rope, "full_attention": rope["indexed_attention"]}
        return extra
