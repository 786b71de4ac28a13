"""Checks on a Hugging Face checkpoint folder, done before any heavy work so bad input fails fast."""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any, Iterator

from ..archs import ArchAdapter, MoeShape, adapter_for, key_mapping, text_config
from ..archs.base import meta_model
from ..errors import GemqError
from .hf_to_gguf import check_tokenizer
from .weights_check import check_safetensors, check_shapes


def load_config(model_dir: Path, trust_remote_code: bool = False) -> Any:
    """The transformers config, with a clear error for a missing or unreadable folder."""
    if not model_dir.is_dir():
        raise GemqError(f"model folder {model_dir} does not exist or is not a folder.",
                        "pass the folder of a Hugging Face checkpoint (with config.json), or 'demo'.")
    if not (model_dir / "config.json").is_file():
        raise GemqError(f"{model_dir} has no config.json, so it is not a Hugging Face checkpoint.",
                        "pass the folder that holds config.json and the *.safetensors files.")
    from transformers import AutoConfig
    errors = (OSError, ValueError, KeyError, json.JSONDecodeError)
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)  # transformers' own class first
    except errors as e:
        remote = _needs_remote_code(model_dir, e)
        if remote is None:
            raise _unreadable(model_dir, e) from None
        if not trust_remote_code:
            raise remote from None
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    except errors as e:
        raise _unreadable(model_dir, e) from None


def _unreadable(model_dir: Path, e: Exception) -> GemqError:
    return GemqError(f"{model_dir}/config.json cannot be read by transformers ({str(e).splitlines()[0]}).",
                     "check the file, or upgrade transformers if the model type is newer.")


EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def check_moe(config: Any) -> None:
    """A dense model gets its own message, whatever its architecture."""
    counts = [getattr(c, k, None) for c in (config, getattr(config, "ffn_config", None))  # DBRX: in ffn_config
              for k in EXPERT_COUNT_KEYS]
    if not any(isinstance(c, int) and c > 1 for c in counts):
        name = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
        raise GemqError(f"{name} is a dense model (no routed experts).",
                        "gemq-gguf quantizes Mixture-of-Experts models; use llama-quantize for dense ones.")


REMOTE_CODE_FIX = "pass --trust-remote-code if you trust the checkpoint's code (it is off by default)."


def _needs_remote_code(model_dir: Path, e: Exception) -> GemqError | None:
    """transformers' refusal to run a checkpoint's own code (auto_map), as our one-line error."""
    if "trust_remote_code" not in str(e):
        return None
    return GemqError(f"{model_dir} needs its own Python code (auto_map) to load, which does not run by default.",
                     REMOTE_CODE_FIX)


@contextlib.contextmanager
def remote_code_policy(model_dir: Path, allowed: bool) -> Iterator[None]:
    """Every tokenizer loaded in the block gets trust_remote_code=`allowed`, whoever asks: llama.cpp's
    converter passes True for many architectures, which would run a checkpoint's tokenizer code unasked.
    (Models and configs are always loaded with it off: the adapters need transformers' own classes.)"""
    from transformers import AutoTokenizer
    original = AutoTokenizer.__dict__["from_pretrained"]

    def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
        kwargs["trust_remote_code"] = allowed
        return original.__func__(cls, *args, **kwargs)

    AutoTokenizer.from_pretrained = classmethod(from_pretrained)
    try:
        yield
    except ImportError as e:  # transformers' check of the packages the checkpoint's code imports (e.g. tiktoken)
        if "requires the following packages" not in str(e):
            raise
        raise GemqError(f"{model_dir}'s own code needs packages that are not installed ({e}).",
                        "install them, then run again.") from None
    except (ValueError, OSError) as e:
        err = _needs_remote_code(model_dir, e)
        if err is None:
            raise
        raise err from None
    finally:
        AutoTokenizer.from_pretrained = original


def inspect_checkpoint(model_dir: Path, trust_remote_code: bool = False) -> tuple[Any, ArchAdapter, MoeShape]:
    """Config, adapter and MoE shape of a checkpoint, after every cheap validity check (for a multimodal
    checkpoint: its text model's config)."""
    loaded = load_config(model_dir, trust_remote_code)
    check_moe(loaded.get_text_config())
    adapter = adapter_for(getattr(loaded, "architectures", None))
    config = text_config(loaded)  # a multimodal checkpoint: its text model, which is what GEMQ quantizes
    if adapter.tokenizer_is_code and not trust_remote_code:
        raise GemqError(f"{model_dir}'s tokenizer ({adapter.name}) is the checkpoint's own Python code, which "
                        "llama.cpp's converter runs to read the vocabulary; it does not run by default.", REMOTE_CODE_FIX)
    shape = adapter.moe_shape(config)
    check_tokenizer(model_dir)
    stored = check_safetensors(model_dir)
    renames = [(re.compile(k), v) for k, v in key_mapping(loaded).items()]
    for pattern, new in renames:
        stored = {pattern.sub(new, k): v for k, v in stored.items()}
    check_shapes({k: tuple(v.shape) for k, v in meta_model(config).state_dict().items()}, stored, shape)
    return config, adapter, shape


def float_outtype(config: Any) -> str:
    """Keep the checkpoint's precision in the intermediate GGUF: f32 stays f32, else bf16/f16."""
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16")
    return {"float32": "f32", "torch.float32": "f32", "float16": "f16", "torch.float16": "f16"}.get(dtype, "bf16")


def tied_embeddings(config: Any) -> bool:
    """Whether the LM head is the input embedding (transformers' default when the config does not say)."""
    return bool(getattr(config, "tie_word_embeddings", False))
