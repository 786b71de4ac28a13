"""Checks on a Hugging Face checkpoint folder, done before any heavy work so bad input fails fast."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from ..archs import ArchAdapter, MoeShape, adapter_for
from ..errors import GemqError
from .hf_to_gguf import check_tokenizer


def load_config(model_dir: Path) -> Any:
    """The transformers config, with a clear error for a missing or unreadable folder."""
    if not model_dir.is_dir():
        raise GemqError(f"model folder {model_dir} does not exist or is not a folder.",
                        "pass the folder of a Hugging Face checkpoint (with config.json), or 'demo'.")
    if not (model_dir / "config.json").is_file():
        raise GemqError(f"{model_dir} has no config.json, so it is not a Hugging Face checkpoint.",
                        "pass the folder that holds config.json and the *.safetensors files.")
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise GemqError(f"{model_dir}/config.json cannot be read by transformers ({str(e).splitlines()[0]}).",
                        "check the file, or upgrade transformers if the model type is newer.") from None


def check_safetensors(model_dir: Path) -> list[Path]:
    """Every shard's header must parse and its data must be complete (catches truncated downloads)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GemqError(f"{model_dir} has no *.safetensors weights.",
                        "save the model with safe_serialization=True (pytorch_model.bin is not read).")
    for f in files:
        size = f.stat().st_size
        try:
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n <= 0 or 8 + n > size:
                    raise ValueError("header length beyond the end of the file")
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise GemqError(f"{f} is corrupt ({e}).", "download or save the checkpoint again.") from None
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise GemqError(f"{f} is truncated: {size} bytes, its header needs {8 + n + end}.",
                            "download or save the checkpoint again.")
    return files


EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def check_moe(config: Any) -> None:
    """A dense model gets its own message, whatever its architecture."""
    counts = [getattr(config, k, None) for k in EXPERT_COUNT_KEYS]
    if not any(isinstance(c, int) and c > 1 for c in counts):
        name = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
        raise GemqError(f"{name} is a dense model (no routed experts).",
                        "gemq-gguf quantizes Mixture-of-Experts models; use llama-quantize for dense ones.")


def inspect_checkpoint(model_dir: Path) -> tuple[Any, ArchAdapter, MoeShape]:
    """Config, adapter and MoE shape of a checkpoint, after every cheap validity check."""
    config = load_config(model_dir)
    check_moe(config)
    adapter = adapter_for(getattr(config, "architectures", None))
    shape = adapter.moe_shape(config)
    check_tokenizer(model_dir)
    check_safetensors(model_dir)
    return config, adapter, shape


def float_outtype(config: Any) -> str:
    """Keep the checkpoint's precision in the intermediate GGUF: f32 stays f32, else bf16/f16."""
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16")
    return {"float32": "f32", "torch.float32": "f32", "float16": "f16", "torch.float16": "f16"}.get(dtype, "bf16")


def tied_embeddings(config: Any) -> bool:
    """Whether the LM head is the input embedding (transformers' default when the config does not say)."""
    return bool(getattr(config, "tie_word_embeddings", False))
