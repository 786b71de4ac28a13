"""The language model inside a multimodal (`*ForConditionalGeneration`) checkpoint, as a causal LM.

Released Qwen3.5-MoE, Llama 4, Gemma 4, Qwen3-VL-MoE, GLM-4.5V, dots3-note, MiniMax-M3 and Qwen3-Omni checkpoints
are vision-language wrappers: a vision tower and projector (some an audio tower too) around the text model. GEMQ quantizes the text model only
(llama.cpp's converter writes the text model from the same checkpoint; the vision projector is a separate
`--mmproj` file), so calibration, costs and router tuning run on the causal LM of the wrapper's
`text_config` (transformers' class, or `TextForCausalLM` made from its text base model where transformers
has none), loaded from the wrapper's tensors: their checkpoint names are renamed to the causal LM's
(`key_mapping`), found from the module trees (the parent of the input embeddings and the output embeddings,
in the wrapper and in the causal LM); the vision tensors name nothing in the causal LM and are never read.
"""
from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from ..errors import GemqError


def is_wrapper(config: Any) -> bool:
    """A multimodal config: its text model has a config of its own (`text_config`)."""
    return config.get_text_config() is not config


def text_config(config: Any) -> Any:
    """The config of the causal LM GEMQ quantizes: `config` itself for a causal LM; for a wrapper, a copy of its
    `text_config` naming the causal-LM class (`causal_lm_name`) and holding the wrapper's embedding tying (the
    wrapper's flag decides whether its LM head is the embedding: Qwen3-VL-MoE's text_config says tied, the
    wrapper not)."""
    if not is_wrapper(config):
        return config
    text = copy.deepcopy(config.get_text_config())
    name = causal_lm_name(type(text))
    # the causal LM's class first (transformers, the adapters), then the checkpoint's (llama.cpp's converter
    # knows the latter: tensor names for GEMQ's non-expert statistics)
    text.architectures = [name, *(config.architectures or [])] if name else None
    text.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", text.tie_word_embeddings))
    if getattr(text, "dtype", None) is None:
        text.dtype = getattr(config, "dtype", None)
    return text


def key_mapping(config: Any) -> dict[str, str]:
    """Regex renames (as `from_pretrained(key_mapping=...)` takes them) of a wrapper checkpoint's text
    tensors to the causal LM's names; {} for a causal LM."""
    if not is_wrapper(config):
        return {}
    key = config.to_json_string(use_diff=False)
    if key not in _MAPPINGS:
        _MAPPINGS[key] = _measure_mapping(config)
        _take_conversions(config, _MAPPINGS[key])
    return dict(_MAPPINGS[key])


_MAPPINGS: dict[str, dict[str, str]] = {}


def _measure_mapping(config: Any) -> dict[str, str]:
    """Both module trees built on the meta device (no weights): where the wrapper keeps the text base model
    and the LM head, and where the causal LM keeps them."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    wrapper_cls = getattr(transformers, (config.architectures or [""])[0], None)  # transformers' own classes only
    with torch.device("meta"):
        wrapper = wrapper_cls(config) if wrapper_cls is not None else AutoModelForImageTextToText.from_config(config)
        text = AutoModelForCausalLM.from_config(text_config(config))
    renames, inner = {}, _base(text)
    for outer, inner in ((_base(wrapper, type(text.get_submodule(inner))), inner),
                         (_head(wrapper, text.config), _name(text, text.get_output_embeddings()))):
        for prefix in dict.fromkeys((outer, _saved_prefix(wrapper, outer))):
            if prefix != inner:
                renames[f"^{re.escape(prefix)}\\."] = f"{inner}."
    return renames


def _saved_prefix(model: nn.Module, prefix: str) -> str:
    """The name a save gives the module at `prefix`: transformers saves some wrappers under their released
    checkpoints' names (its weight conversions reversed, as `revert_weight_conversion` does for a model not
    loaded from a checkpoint): Qwen3-Omni's `thinker.model.language_model.` as `thinker.model.`, MiniMax-M3's
    `model.language_model.` as `language_model.model.`."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming, apply_renamings
    leaf = next(n for n, _ in model.get_submodule(prefix).named_parameters())
    conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    saved = apply_renamings(f"{prefix}.{leaf}", [c.reverse_transform() for c in conversions[::-1]
                                                 if isinstance(c, WeightRenaming)])
    return saved.removesuffix(f".{leaf}") if saved.endswith(f".{leaf}") else prefix


def _base(model: nn.Module, base: type | None = None) -> str:
    """Where the text base model (embeddings, layers, final norm) sits: the parent of the input embeddings, or
    the module of class `base` in a wrapper that does not say (Qwen3-Omni keeps it in its `thinker`)."""
    try:
        return _name(model, model.get_input_embeddings()).rpartition(".")[0]
    except NotImplementedError:
        return next(n for n, m in model.named_modules() if type(m) is base)


def _head(model: nn.Module, text: Any) -> str:
    """The LM head of a wrapper: its output embeddings, or the one [vocab, hidden] linear layer where it does
    not say."""
    try:
        head = model.get_output_embeddings()
    except NotImplementedError:
        head = None
    if head is not None:
        return _name(model, head)
    heads = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and
             (m.out_features, m.in_features) == (text.vocab_size, text.hidden_size)]
    if len(heads) != 1:
        raise GemqError(f"{type(model).__name__} names no LM head, and {len(heads)} of its layers have its shape.",
                        "please report the model.")
    return heads[0]


def _name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def load_text_model(path: Any, **kwargs: Any) -> nn.Module:
    """The causal LM of the checkpoint at `path` (its text model for a wrapper), from safetensors only (never
    a pickle); kwargs as `from_pretrained` takes them (dtype, device_map, experts_implementation)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path)
    if not is_wrapper(config):
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, config=text_config(config), key_mapping=key_mapping(config),
                                                use_safetensors=True, **kwargs)


def causal_lm_name(config_class: type) -> str | None:
    """The `AutoModelForCausalLM` class of a text config. transformers gives some text models none (Qwen3-VL-MoE,
    GLM-4.5V): then one is made from its text base model (`AutoModel` of the config) and an LM head, as its
    wrapper computes text logits, and registered with `AutoModelForCausalLM`. None without a base model."""
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
    kind = getattr(config_class, "model_type", "")
    if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[kind]
    base_name = MODEL_MAPPING_NAMES.get(kind)
    base = getattr(transformers, base_name, None) if base_name else _unregistered_text_model(config_class)
    if base is None:
        return None
    name = base.__name__.removesuffix("Model") + "ForCausalLM"
    if name not in _MADE:
        # in the family's module: transformers reads it to see that the experts' implementation can be chosen
        family = next(c for c in base.__mro__[1:] if issubclass(c, transformers.PreTrainedModel))
        cls = type(name, (TextForCausalLM, family), {"config_class": config_class, "_text_model": base,
                                                      "__module__": base.__module__})
        AutoModelForCausalLM.register(config_class, cls, exist_ok=True)
        _MADE[name] = cls
    return name


_MADE: dict[str, type] = {}


def _unregistered_text_model(config_class: type) -> type | None:
    """The `*TextModel` of the config's family that transformers does not map to its text config (Qwen3-Omni's
    thinker text model, Step-3.7's): the family's modeling module names it with that config class."""
    import importlib

    from transformers import PreTrainedModel
    try:
        module = importlib.import_module(config_class.__module__.replace(".configuration_", ".modeling_"))
    except ImportError:
        return None
    return next((c for n, c in vars(module).items() if n.endswith("TextModel") and isinstance(c, type) and
                 issubclass(c, PreTrainedModel) and getattr(c, "config_class", None) is config_class), None)


def _take_conversions(config: Any, renames: dict[str, str]) -> None:
    """transformers keys a checkpoint's weight conversions (Qwen3-VL-MoE's transposed experts, GLM-4.5V's and
    MiniMax-M3's per-expert tensors, MiniMax-M3's released names) by the wrapper's model_type; the causal LM loads
    the same tensors, so where it has no conversions of its own it gets the wrapper's, followed by `renames` (they
    name the wrapper's modules, as MiniMax-M3's `language_model.model.` -> `model.language_model.` does)."""
    from transformers.conversion_mapping import (USER_REGISTERED_MAPPINGS, get_checkpoint_conversion_mapping,
                                                 register_checkpoint_conversion_mapping)
    from transformers.core_model_loading import WeightRenaming
    text = config.get_text_config()
    name = causal_lm_name(type(text))
    mapping = get_checkpoint_conversion_mapping(config.model_type)
    if not mapping or name is None or name in USER_REGISTERED_MAPPINGS or \
            get_checkpoint_conversion_mapping(name) or get_checkpoint_conversion_mapping(text.model_type):
        return
    register_checkpoint_conversion_mapping(name, [*mapping, *(WeightRenaming(k, v) for k, v in renames.items())])


class TextForCausalLM:
    """A text base model (`model`: embeddings, layers, final norm) and an LM head, called as the wrapper calls
    them for text alone: logits = lm_head(model(ids)). Mixed in before the family's PreTrainedModel."""

    _text_model: type
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Any) -> None:
        super().__init__(config)  # type: ignore[call-arg]
        self.model = self._text_model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()  # type: ignore[attr-defined]

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        return CausalLMOutputWithPast(logits=self.lm_head(out.last_hidden_state), past_key_values=out.past_key_values)
