"""Stage 1 of a conversion: Hugging Face checkpoint -> float GGUF, by llama.cpp's own converter.

We drive `convert_hf_to_gguf` (from the same pinned llama.cpp as the runtime) in-process rather than
rewrite metadata, tokenizer conversion and tensor naming for every architecture: whatever llama.cpp's
converter writes is by definition what llama.cpp loads. Stage 2 (`writer`) re-types that file tensor
by tensor. The converter is lazy (it streams tensors from safetensors), so memory stays near one tensor.

One fallback is added: the converter identifies BPE pre-tokenizers by hashing the tokenization of a
test string and refuses unknown ones. For a tokenizer whose pre-tokenizer is plain GPT-2 byte-level
BPE we set `tokenizer.ggml.pre = "gpt-2"`, which tokenizes identically in llama.cpp.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..archs import adapter_for
from ..errors import GemqError
from ..runtime import converter_dir

FLOAT_OUTTYPES = ("f32", "f16", "bf16")


def _import_converter() -> Any:
    d = converter_dir()
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    try:
        import conversion  # type: ignore[import-not-found]
    except ImportError as e:
        raise GemqError(f"llama.cpp's converter could not be imported from {d} ({e}).",
                        "run ./setup.sh, which installs it next to the patched runtime.") from None
    return conversion


def _pre_tokenizer_fallback(model_dir: Path) -> str | None:
    """'gpt-2' when tokenizer.json uses plain byte-level pre-tokenization (what llama.cpp calls gpt-2)."""
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return None
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return None


def _add_fallback(model: Any, model_dir: Path) -> None:
    """Patch the converter instance (its classes are registered, so we do not subclass them)."""
    fallback = _pre_tokenizer_fallback(model_dir)
    original = model.get_vocab_base_pre

    def get_vocab_base_pre(tokenizer: Any) -> str:
        try:
            return original(tokenizer)
        except NotImplementedError:
            if fallback is None:
                raise GemqError(f"llama.cpp does not recognise the pre-tokenizer of {model_dir}.",
                                "use a tokenizer llama.cpp knows (see convert_hf_to_gguf_update.py).") from None
            logging.getLogger("gemq").info("unknown BPE pre-tokenizer hash; using '%s' (byte-level)", fallback)
            return fallback

    model.get_vocab_base_pre = get_vocab_base_pre


def check_tokenizer(model_dir: Path) -> None:
    """The converter needs the tokenizer files; say so before any heavy work starts."""
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((model_dir / n).exists() for n in names):
        raise GemqError(f"{model_dir} has no tokenizer (none of {', '.join(names)}).",
                        "copy the tokenizer files of the original model into the checkpoint folder.")


def hf_to_float_gguf(model_dir: Path, out_path: Path, outtype: str = "f32", verbose: bool = False) -> Path:
    """Convert a Hugging Face checkpoint to an unquantized GGUF at out_path (f32, f16 or bf16)."""
    if outtype not in FLOAT_OUTTYPES:
        raise ValueError(f"outtype must be one of {FLOAT_OUTTYPES}")
    check_tokenizer(model_dir)
    conversion = _import_converter()
    import gguf
    import torch

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype]
    hparams = conversion.ModelBase.load_hparams(model_dir, False)
    arch = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    try:
        cls = conversion.get_model_class(arch)
    except NotImplementedError:
        raise GemqError(f"llama.cpp's converter does not support {arch}.", "use a supported architecture.") from None
    adapter = adapter_for(hparams.get("architectures"))
    hparams = {**hparams, **adapter.converter_hparams(hparams)}
    if cls.supports_mtp_export:
        # transformers loads no multi-token-prediction layers, so GEMQ has no statistics for them
        cls = type(cls.__name__, (cls,), {"model_arch": cls.model_arch, "no_mtp": True})
    logging.getLogger("hf-to-gguf").setLevel(logging.INFO if verbose else logging.WARNING)
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with torch.inference_mode(), sink:
        model = cls(model_dir, ftype, out_path, eager=False, hparams=hparams)
        _add_fallback(model, model_dir)
        model.write()
    return out_path
