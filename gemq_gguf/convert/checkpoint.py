"""Checks on a Hugging Face checkpoint folder, done before any heavy work so bad input fails fast."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..archs import ArchAdapter, MoeShape, adapter_for
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
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise GemqError(f"{model_dir}/config.json cannot be read by transformers ({str(e).splitlines()[0]}).",
                        "check the file, or upgrade transformers if the model type is newer.") from None


EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def check_moe(config: Any) -> None:
    """A dense model gets its own message, whatever its architecture."""
    counts = [getattr(config, k, None) for k in EXPERT_COUNT_KEYS]
    if not any(isinstance(c, int) and c > 1 for c in counts):
        name = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
        raise GemqError(f"{name} is a dense model (no routed experts).",
                        "gemq-gguf quantizes Mixture-of-Experts models; use llama-quantize for dense ones.")


def check_remote_code(model_dir: Path, trust_remote_code: bool) -> None:
    """A checkpoint that ships Python code (`auto_map`) runs it when its tokenizer or model is loaded
    (llama.cpp's converter loads tokenizers with trust_remote_code=True): only when the user says so."""
    if trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json"):
        path = model_dir / name
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError):
            continue  # load_config / the tokenizer check report unreadable files
        if isinstance(data, dict) and data.get("auto_map"):
            raise GemqError(f"{path} asks to run the checkpoint's own Python code (auto_map), which is off by "
                            "default.", "pass --trust-remote-code if you trust this checkpoint's code.")


def inspect_checkpoint(model_dir: Path, trust_remote_code: bool = False) -> tuple[Any, ArchAdapter, MoeShape]:
    """Config, adapter and MoE shape of a checkpoint, after every cheap validity check."""
    check_remote_code(model_dir, trust_remote_code)
    config = load_config(model_dir, trust_remote_code)
    check_moe(config)
    adapter = adapter_for(getattr(config, "architectures", None))
    shape = adapter.moe_shape(config)
    check_tokenizer(model_dir)
    stored = check_safetensors(model_dir)
    check_shapes({k: tuple(v.shape) for k, v in meta_model(config).state_dict().items()}, stored, shape)
    return config, adapter, shape


def float_outtype(config: Any) -> str:
    """Keep the checkpoint's precision in the intermediate GGUF: f32 stays f32, else bf16/f16."""
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16")
    return {"float32": "f32", "torch.float32": "f32", "float16": "f16", "torch.float16": "f16"}.get(dtype, "bf16")
