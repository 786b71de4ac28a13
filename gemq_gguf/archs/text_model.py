"""The language model inside a multimodal (`*ForConditionalGeneration`) checkpoint, as a causal LM.

Released Qwen3.5-MoE, Llama 4 and Gemma 4 checkpoints are vision-language wrappers: a vision tower and
projector around the text model. GEMQ quantizes the text model only (llama.cpp's converter writes the
text model from the same checkpoint; the vision projector is a separate `--mmproj` file), so calibration,
costs and router tuning run on transformers' causal-LM class of the wrapper's `text_config`, loaded from
the wrapper's tensors: the text tensors' checkpoint names are renamed to the causal LM's (`key_mapping`),
found from the module trees (the parent of the input embeddings and the output embeddings, in the
wrapper and in the causal LM), and the vision tensors match no name of the causal LM, so they are never read.
"""
from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn


def is_wrapper(config: Any) -> bool:
    """A multimodal config: its text model has a config of its own (`text_config`)."""
    return config.get_text_config() is not config


def text_config(config: Any) -> Any:
    """The config of the causal LM GEMQ quantizes: `config` itself for a causal LM; for a wrapper, a copy
    of its `text_config` naming transformers' causal-LM class for it (None when transformers has none)
    and the wrapper's embedding tying (the wrapper's own flag decides whether its LM head is the embedding)."""
    if not is_wrapper(config):
        return config
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    text = copy.deepcopy(config.get_text_config())
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text.model_type)
    text.architectures = [name] if name else None
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
    return dict(_MAPPINGS[key])


_MAPPINGS: dict[str, dict[str, str]] = {}


def _measure_mapping(config: Any) -> dict[str, str]:
    """Both module trees built on the meta device (no weights): where the wrapper keeps the text base model
    and the LM head, and where the causal LM keeps them."""
    import transformers
    from transformers import AutoModelForCausalLM
    wrapper_cls = getattr(transformers, (config.architectures or [""])[0], None)
    if wrapper_cls is None:
        from transformers import AutoModelForImageTextToText as wrapper_cls  # type: ignore[no-redef]
    with torch.device("meta"):
        wrapper = wrapper_cls.from_config(config) if wrapper_cls.__name__.startswith("Auto") else wrapper_cls(config)
        text = AutoModelForCausalLM.from_config(text_config(config))
    renames = {}
    for outer, inner in ((_base(wrapper), _base(text)), (_name(wrapper, wrapper.get_output_embeddings()),
                                                         _name(text, text.get_output_embeddings()))):
        if outer != inner:
            renames[f"^{re.escape(outer)}\\."] = f"{inner}."
    return renames


def _base(model: nn.Module) -> str:
    """Where the text base model (embeddings, layers, final norm) sits: the parent of the input embeddings."""
    return _name(model, model.get_input_embeddings()).rpartition(".")[0]


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
