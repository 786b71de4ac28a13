"""Stage 1 of a conversion: Hugging Face checkpoint -> float GGUF, by llama.cpp's own converter.

We drive `convert_hf_to_gguf` (from the same pinned llama.cpp as the runtime) in-process rather than
rewrite metadata, tokenizer conversion and tensor naming for every architecture: whatever llama.cpp's
converter writes is by definition what llama.cpp loads. Stage 2 (`writer`) re-types that file tensor
by tensor. The converter is lazy (it streams tensors from safetensors), so memory stays near one tensor.

Additions: the converter identifies BPE pre-tokenizers by hashing the tokenization of a
test string and refuses unknown ones. For a tokenizer whose loaded pre-tokenizer is plain GPT-2 byte-level
BPE we set `tokenizer.ggml.pre = "gpt-2"`, and for Qwen's regex split 'qwen2' / 'qwen35', which split
identically in llama.cpp. Per family, the adapter adds config keys the converter needs that a re-save by
transformers drops (`ArchAdapter.converter_hparams`); multi-token-prediction layers are left out.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..archs import adapter_for, supported
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


#: pre-tokenizer regexes (as tokenizer.json writes them) -> llama.cpp's name for the same splitting
_PRE_BY_REGEX = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen35",
}


def _pre_tokenizer_fallback(tokenizer: Any) -> str | None:
    """llama.cpp's name for the pre-tokenizer the *loaded* tokenizer runs (a tokenizer class may replace
    the one in tokenizer.json: transformers' Qwen3.5 class installs Qwen's regex): plain byte-level BPE is
    'gpt-2', Qwen's regex split before byte-level is 'qwen2' / 'qwen35'; None for anything else."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(parts) == 2 and parts[0].get("type") == "Split"
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)):
        return _PRE_BY_REGEX.get((parts[0].get("pattern") or {}).get("Regex", ""))
    return None


def _add_fallback(model: Any, model_dir: Path) -> None:
    """Patch the converter instance (its classes are registered, so we do not subclass them)."""
    original = model.get_vocab_base_pre

    def get_vocab_base_pre(tokenizer: Any) -> str:
        try:
            return original(tokenizer)
        except NotImplementedError:
            fallback = _pre_tokenizer_fallback(tokenizer)
            if fallback is None:
                raise GemqError(f"llama.cpp does not recognise the pre-tokenizer of {model_dir}.",
                                "use a tokenizer llama.cpp knows (see convert_hf_to_gguf_update.py).") from None
            logging.getLogger("gemq").info("unknown BPE pre-tokenizer hash; the tokenizer splits like '%s'", fallback)
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
    if any(a in supported() for a in hparams.get("architectures") or []):  # others convert as llama.cpp does
        hparams = {**hparams, **adapter_for(hparams["architectures"]).converter_hparams(hparams)}
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
