"""The supported MoE families: one registration each (Hugging Face classes -> llama.cpp architecture),
plus an override where a family's semantics differ from what `base.ArchAdapter` finds on its own.

Adding a family: register it here (or in `sigmoid_families.py` when it scores experts DeepSeek-V3's way), add a tiny config to tests/tiny_models.py, and run the family tests
(tests/test_families.py); docs/families.md says what each family needed. A multimodal checkpoint
(`*ForConditionalGeneration`) is registered with the adapter of its text model, which is what GEMQ
quantizes (`text_model.py`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GemqError
from .base import ArchAdapter, MoeShape
from ..ggml.names import ROUTER
from .experts import ExpertsCall, ExpertsView, Layout
from .registry import register
from .sigmoid_families import SarvamMoe


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


@register
class Glm4Moe(ArchAdapter):
    """GLM-4.5 / 4.6 / 4.7: DeepSeek-V3's routing, partial rotary attention, the first layers dense."""

    hf_classes = ("Glm4MoeForCausalLM",)
    name = "glm4moe"

    def converter_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        # transformers builds Sarvam-MoE as GLM-4.5 and a re-save names that class, but keeps Sarvam's tensor
        # names and keys, which only the converter's Sarvam class reads
        if hparams.get("model_type") != "sarvam_moe":
            return {}
        return {"architectures": ["SarvamMoEForCausalLM"], **SarvamMoe().converter_hparams(hparams)}


@register
class GptOss(ArchAdapter):
    """gpt-oss: softmax after top-k, expert biases, clamped SwiGLU on interleaved gate/up columns."""

    hf_classes = ("GptOssForCausalLM",)
    name = "gpt-oss"


@register
class Qwen3Next(ArchAdapter):
    """Qwen3-Next: linear-attention (Gated DeltaNet) layers, a gated shared expert."""

    hf_classes = ("Qwen3NextForCausalLM",)
    name = "qwen3next"


@register
class Qwen35Moe(ArchAdapter):
    """Qwen3.5-MoE: Qwen3-Next's layers; the released vision-language checkpoint's text model too."""

    hf_classes = ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration")
    name = "qwen35moe"


@register
class Qwen3VLMoe(ArchAdapter):
    """Qwen3-VL-MoE (text model of the vision-language checkpoint): Qwen3-MoE's layers with interleaved M-RoPE;
    transformers has no causal-LM class for it (`text_model.TextForCausalLM`)."""

    hf_classes = ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeTextForCausalLM")
    name = "qwen3vlmoe"


@register
class Qwen3OmniMoe(ArchAdapter):
    """Qwen3-Omni (text model of its thinker): Qwen3-MoE's layers with interleaved M-RoPE, beside the thinker's
    vision and audio towers and the talker; transformers maps no class to its text config
    (`text_model.TextForCausalLM` over `Qwen3OmniMoeThinkerTextModel`)."""

    hf_classes = ("Qwen3OmniMoeForConditionalGeneration", "Qwen3OmniMoeThinkerTextForCausalLM")
    name = "qwen3omnimoe"


@register
class Glm4vMoe(ArchAdapter):
    """GLM-4.5V (text model of the vision-language checkpoint): GLM-4.5's MoE with M-RoPE; transformers has no
    causal-LM class for it (`text_model.TextForCausalLM`)."""

    hf_classes = ("Glm4vMoeForConditionalGeneration", "Glm4vMoeTextForCausalLM")
    name = "glm4vmoe"


@register
class GraniteMoe(ArchAdapter):
    """Granite-MoE (3.0/3.1): fused input/output linears, softmax after top-k."""

    hf_classes = ("GraniteMoeForCausalLM",)
    name = "granitemoe"


@register
class Lfm2Moe(ArchAdapter):
    """LFM2-MoE: short-convolution layers, sigmoid scores with an expert bias, the first layers dense."""

    hf_classes = ("Lfm2MoeForCausalLM",)
    name = "lfm2moe"


@register
class GraniteMoeShared(ArchAdapter):
    """Granite-MoE with a shared MLP, a sibling of the MoE block (so not in its experts' output)."""

    hf_classes = ("GraniteMoeSharedForCausalLM",)
    name = "granitemoeshared"


@register
class GraniteMoeHybrid(ArchAdapter):
    """Granite 4.0: Mamba-2 and attention layers, each with an MoE block and a shared MLP beside it."""

    hf_classes = ("GraniteMoeHybridForCausalLM",)
    name = "granitemoehybrid"

    def converter_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        # transformers 5 saves the layer kinds as full_attention / linear_attention; the converter knows
        # only Granite's own names (it would take every layer for a Mamba layer)
        names = {"full_attention": "attention", "linear_attention": "mamba"}
        types = hparams.get("layer_types") or []
        return {"layer_types": [names.get(t, t) for t in types]} if any(t in names for t in types) else {}


@register
class SolarOpen(ArchAdapter):
    """Solar Open: GLM-4.5's MoE (sigmoid routing with a correction bias, a shared expert)."""

    hf_classes = ("SolarOpenForCausalLM",)
    name = "solar-open"

    def converter_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        # rotary over the whole head unless the config says otherwise; the converter (GLM's) assumes half
        rope = hparams.get("rope_parameters") or {}
        return {} if "partial_rotary_factor" in hparams or "partial_rotary_factor" in rope else \
            {"partial_rotary_factor": 1.0}



@register
class HyV3(ArchAdapter):
    """Hunyuan 3 (HY-V3): a shared expert, `router_scaling_factor`, dense first layers."""

    hf_classes = ("HYV3ForCausalLM",)
    name = "hy-v3"


@register
class HunYuanMoeV1(ArchAdapter):
    """Hunyuan-MoE v1 (Hunyuan-A13B): softmax top-k renormalised, a shared MLP added to the experts' output,
    query/key RMS norms after rope; the router is `gate.wg`. Its tokenizer is the checkpoint's own code
    (tiktoken ranks in `tokenization_hy.py`), which llama.cpp's converter loads."""

    hf_classes = ("HunYuanMoEV1ForCausalLM",)
    name = "hunyuan-moe"
    tokenizer_is_code = True

    def top_k(self, config: Any) -> int:
        k = config.moe_topk  # one value, or one per layer (the released config)
        if isinstance(k, int):
            return k
        if len(set(k)) != 1:
            raise GemqError(f"HunYuanMoEV1ForCausalLM with a top-k per layer ({sorted(set(k))}).",
                            "such models are not supported yet; please report the model.")
        return int(k[0])

    def router(self, block: nn.Module) -> nn.Module:
        return block.gate.wg

    def converter_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        # the converter reads the released config's per-layer lists; transformers' config class drops the
        # expert and shared widths (it builds both from `intermediate_size`) and may save top-k as one value
        n, extra = hparams["num_hidden_layers"], {}
        if "moe_intermediate_size" not in hparams:
            extra["moe_intermediate_size"] = [hparams["intermediate_size"]] * n
        if "num_shared_expert" not in hparams:
            extra["num_shared_expert"] = [1] * n
        if isinstance(hparams.get("moe_topk"), int):
            extra["moe_topk"] = [hparams["moe_topk"]] * n
        return extra


@register
class Llama4(ArchAdapter):
    """Llama 4 (text): a shared expert beside top-k experts whose sigmoid router weight scales the expert's
    *input*, E(w x); its experts module runs every expert on every token (the unchosen get x = 0) outside
    transformers' experts interface, so the routing is read from the router's own call, and the gradient
    at the experts' output from the block's output (shared expert + experts, so the same gradient)."""

    hf_classes = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")
    name = "llama4"

    def block_of(self, layer_module: nn.Module) -> nn.Module | None:
        ff = getattr(layer_module, "feed_forward", None)
        return ff if hasattr(ff, "router") and hasattr(ff, "experts") else None

    def experts_module(self, block: nn.Module) -> nn.Module:
        return block.experts

    def experts(self, block: nn.Module) -> ExpertsView:
        return ExpertsView(block.experts, Layout(has_gate=True, is_transposed=True, is_concatenated=True),
                           input_weighted=True)

    def router(self, block: nn.Module) -> nn.Module:
        return block.router

    def hook_experts(self, block: nn.Module, on_call: Callable[[ExpertsCall], None],
                     on_out: Callable[[torch.Tensor], None]) -> list[Any]:
        def routed(router: nn.Module, args: tuple[Any, ...], out: tuple[torch.Tensor, torch.Tensor]) -> None:
            scores, logits = out
            ids = torch.topk(logits, router.top_k, dim=1).indices  # the router's own call: the same choice
            on_call(ExpertsCall(args[0], ids, scores.gather(1, ids)))
        return [block.router.register_forward_hook(routed),
                block.register_forward_hook(lambda m, args, out: on_out(out[0]))]


@register
class Ernie45Moe(ArchAdapter):
    """ERNIE-4.5-MoE: softmax scores, a selection bias on them (`moe_statics`), renormalised top-k, shared
    experts, the first layers dense; a SentencePiece tokenizer."""

    hf_classes = ("Ernie4_5_MoeForCausalLM",)
    name = "ernie4_5-moe"


@register
class Jamba(ArchAdapter):
    """Jamba: Mamba and attention layers, each with an MoE block or an MLP; softmax top-k, not renormalised."""

    hf_classes = ("JambaForCausalLM",)
    name = "jamba"


class DbrxExpertsView(ExpertsView):
    """DBRX's experts: w1 (gate), v1 (up) and w2 (down, transposed), each [n_experts * ffn, hidden]."""

    def __init__(self, module: nn.Module) -> None:
        mlp = module.mlp
        self.module, self.input_weighted, self.projs = module, False, ("gate", "up", "down")
        self.n_experts, self.ffn, self.hidden = int(module.num_experts), int(module.ffn_hidden_size), int(module.hidden_size)
        self._params = {"gate": mlp.w1, "up": mlp.v1, "down": mlp.w2}
        self._act = mlp.activation_fn

    def weight(self, proj: str, e: int) -> torch.Tensor:
        w = self._params[proj].view(self.n_experts, self.ffn, self.hidden)[e]
        return w.T if proj == "down" else w

    def bias(self, proj: str, e: int) -> torch.Tensor | None:
        return None

    def glu(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        return self._act(gate) * up

    def standard_act(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self._act


@register
class Dbrx(ArchAdapter):
    """DBRX: its own experts module (w1/v1/w2, `DbrxExpertsView`), called as experts(x, ids, weights);
    softmax top-k renormalised by a p-norm (1: llama.cpp's sum)."""

    hf_classes = ("DbrxForCausalLM",)
    name = "dbrx"

    def top_k(self, config: Any) -> int:
        return int(config.ffn_config.moe_top_k)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.transformer.blocks

    def block_of(self, layer_module: nn.Module) -> nn.Module | None:
        return layer_module.ffn

    def experts_module(self, block: nn.Module) -> nn.Module:
        return block.experts

    def experts(self, block: nn.Module) -> ExpertsView:
        return DbrxExpertsView(block.experts)

    def router(self, block: nn.Module) -> nn.Module:
        return block.router.layer


@register
class NemotronH(ArchAdapter):
    """Nemotron-H MoE (Nemotron 3): Mamba-2, attention and MoE layers; non-gated relu² experts (up/down)."""

    hf_classes = ("NemotronHForCausalLM",)
    name = "nemotron_h_moe"


@register
class Cohere2Moe(ArchAdapter):
    """Cohere2-MoE: sliding-window layers, softmax top-k."""

    hf_classes = ("Cohere2MoeForCausalLM",)
    name = "cohere2moe"


@register
class GlmMoeDsa(ArchAdapter):
    """GLM-5 (GLM-MoE-DSA): DeepSeek sparse attention (a lightning indexer picks the keys) over MLA, GLM's
    sigmoid routing with a correction bias, a shared expert, the first layers dense."""

    hf_classes = ("GlmMoeDsaForCausalLM",)
    name = "glm-dsa"


@register
class GraniteMoeSwa(ArchAdapter):
    """Granite-MoE with sliding-window layers (and attention sinks), a shared MLP beside the MoE block."""

    hf_classes = ("GraniteMoeSWAForCausalLM",)
    name = "granitemoeswa"


@register
class Gemma4(ArchAdapter):
    """Gemma 4 MoE (26B-A4B): the decoder layer is the block; beside the dense MLP, the experts read the
    residual through their own norm (`pre_feedforward_layernorm_2`) and their output is normed again
    before it joins the MLP's. The router reads the residual (not the experts' input) through its own
    scale-free norm, `scale` and 1/sqrt(hidden); a per-expert scale multiplies the renormalised top-k
    weights (in the experts call, so calibration and costs see it). Costs take the gradient at the experts'
    output (the default experts hooks); router tuning reads the router's own input."""

    hf_classes = ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration")
    name = "gemma4"

    def block_of(self, layer_module: nn.Module) -> nn.Module | None:
        return layer_module if getattr(layer_module, "enable_moe_block", False) else None

    def experts_module(self, block: nn.Module) -> nn.Module:
        return block.experts

    def router(self, block: nn.Module) -> nn.Module:
        return block.router.proj

    def router_params(self, block: nn.Module) -> dict[str, nn.Parameter]:
        return {ROUTER: block.router.proj.weight}

    def router_input_module(self, block: nn.Module) -> nn.Module:
        return block.router

    def router_logits(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        r = block.router
        h = r.norm(x.reshape(-1, x.shape[-1])) * r.scale * r.scalar_root_size
        return F.linear(h.to(r.proj.weight.dtype), r.proj.weight)


@register
class Afmoe(ArchAdapter):
    """AfMoE (Arcee Trinity): gated attention with q/k norms, rope in the sliding-window layers only, pre and
    post norms, sigmoid routing with a selection bias, top-k renormalised and scaled, a shared expert, dense
    first layers; the router is `router.gate`. llama.cpp's graph fixes two things the config sets: it always
    scales the embeddings by sqrt(hidden) (muP; transformers only with `mup_enabled`) and takes every 4th
    layer as the full-attention, unroped one (src/models/afmoe.cpp), so a config that differs is refused."""

    hf_classes = ("AfmoeForCausalLM",)
    name = "afmoe"

    def moe_shape(self, config: Any) -> MoeShape:
        types = list(getattr(config, "layer_types", None) or [])
        if not getattr(config, "mup_enabled", False):
            raise GemqError("AfmoeForCausalLM with mup_enabled false: llama.cpp's AfMoE graph always scales the "
                            "embeddings by sqrt(hidden_size), so the GGUF would compute another model.",
                            "convert a checkpoint trained with muP (mup_enabled: true, as Arcee's Trinity models).")
        if types != ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(len(types))]:
            raise GemqError(f"AfmoeForCausalLM with layer types {types}: llama.cpp's AfMoE graph takes every 4th "
                            "layer as the full-attention one (no rope) and the others as sliding-window ones.",
                            "convert a checkpoint with global_attn_every_n_layers 4 (Arcee's Trinity models).")
        return super().moe_shape(config)

    def router(self, block: nn.Module) -> nn.Module:
        return block.router.gate

    def converter_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        # transformers' router always renormalises the top-k weights; the converter writes that only from the
        # released config's `route_norm`, which transformers' config class drops (llama.cpp's default: off)
        return {} if "route_norm" in hparams else {"route_norm": True}


@register
class Laguna(ArchAdapter):
    """Laguna (poolside): a softplus attention output gate per head or per element, q/k norms, a rope per layer
    kind, DeepSeek-V3's routing (sigmoid, correction bias, renormalised, scaled), a shared expert, dense first
    layers. llama.cpp's graph takes any sliding window as XS.2's layer pattern (every 4th layer full attention,
    from the first; src/models/laguna.cpp), whatever `layer_types` says, and has no router softcapping."""

    hf_classes = ("LagunaForCausalLM",)
    name = "laguna"

    def moe_shape(self, config: Any) -> MoeShape:
        types = list(config.layer_types)
        xs2 = ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(len(types))]
        if "sliding_attention" in types and types != xs2:
            raise GemqError(f"LagunaForCausalLM with layer types {types}: llama.cpp's Laguna graph takes every 4th "
                            "layer, from the first, as the full-attention one and the others as sliding-window ones.",
                            "convert a checkpoint with that pattern (Laguna-XS.2) or with full attention only.")
        if getattr(config, "moe_router_logit_softcapping", 0.0):
            raise GemqError("LagunaForCausalLM with moe_router_logit_softcapping: llama.cpp's Laguna graph does not "
                            "softcap the router logits, so the GGUF would route differently.",
                            "convert a checkpoint without router softcapping (0.0, as the released models).")
        return super().moe_shape(config)

    def converter_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        # with a window in config.json llama.cpp makes 3 of 4 layers sliding-window ones (and ropes them as such);
        # transformers saves its default window (512) even where every layer has full attention
        if "sliding_attention" not in (hparams.get("layer_types") or []) and hparams.get("sliding_window"):
            return {"sliding_window": None}
        return {}
