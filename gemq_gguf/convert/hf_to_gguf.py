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

One check is added: every tensor is checked for NaN/Inf as the converter writes it (the weights
are in memory then anyway), so a damaged checkpoint fails in stage 1 with the tensor's name.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..archs import adapter_for, supported
from ..errors import GemqError
from ..runtime import import_converter

FLOAT_OUTTYPES = ("f32", "f16", "bf16")


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
    'gpt-2', Qwen's regex split before byte-level is 'qwen2' / 'qwen35', as is a tiktoken tokenizer's
    (Hunyuan-A13B's `tokenization_hy.py`) with that regex; None for anything else."""
    pattern = getattr(getattr(tokenizer, "tokenizer", None), "_pat_str", None)  # a tiktoken Encoding's split
    if isinstance(pattern, str):
        return _PRE_BY_REGEX.get(pattern)
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


class _CheckedTensor:
    """A tensor the converter's GGUFWriter holds until it writes: made eager, checked for NaN/Inf and
    written, so the check costs one pass over bytes already in memory (the weights are read once)."""

    def __init__(self, name: str, tensor: Any, raw_dtype: Any) -> None:
        self.name, self.tensor, self.raw_dtype = name, tensor, raw_dtype
        self.nbytes = tensor.nbytes

    def tofile(self, fout: Any) -> None:
        from gguf import LazyNumpyTensor
        t = self.tensor
        data = LazyNumpyTensor.to_eager(t) if isinstance(t, LazyNumpyTensor) else t
        if isinstance(data, np.ndarray):
            check_finite(self.name, data, self.raw_dtype)
        data.tofile(fout)


def check_finite(name: str, data: np.ndarray, raw_dtype: Any = None) -> None:
    """No NaN or Inf in a float tensor (F32/F16 arrays, or BF16 bits stored as uint16)."""
    from gguf import GGMLQuantizationType
    if raw_dtype == GGMLQuantizationType.BF16:
        bad = int(np.count_nonzero((data.view(np.uint16) & 0x7F80) == 0x7F80))  # exponent all ones
    elif raw_dtype in (None, GGMLQuantizationType.F32, GGMLQuantizationType.F16) and data.dtype.kind == "f":
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    else:
        return
    if bad:
        raise GemqError(f"the checkpoint's weight {name} (GGUF name) holds {bad} NaN/Inf values.",
                        "the checkpoint is damaged: download it again, or fix the run that saved it.")


def _check_finite_on_write(model: Any) -> None:
    """Wrap the converter's writer so every tensor is checked as it is written (instance patch)."""
    writer = model.gguf_writer
    original = writer.add_tensor

    def add_tensor(name: str, tensor: Any, raw_shape: Any = None, raw_dtype: Any = None, **kw: Any) -> None:
        original(name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype, **kw)
        info = writer.tensors[-1].get(name)
        if info is not None and info.tensor is not None:
            info.tensor = _CheckedTensor(name, info.tensor, raw_dtype)

    writer.add_tensor = add_tensor


_EMBEDDING, _HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _add_tied_output(model: Any, model_dir: Path) -> None:
    """Tied embeddings: give the converter the embedding again as the LM head, which it writes as
    output.weight (for architectures whose llama.cpp loader requires that tensor)."""
    tensors = model.model_tensors
    if _HEAD in tensors:
        return
    if _EMBEDDING not in tensors:
        raise GemqError(f"{model_dir} has neither {_HEAD} nor {_EMBEDDING}, and llama.cpp needs an output matrix.",
                        "check that the checkpoint is complete.")
    tensors[_HEAD] = tensors[_EMBEDDING]


def _keep_add_bos_token(model: Any, model_dir: Path) -> None:
    """transformers 5 drops tokenizer_config.json's `add_bos_token` when it loads a tokenizer.json, and some
    converter classes assert it (DeepSeek-V3.2): give the tokenizer they load the checkpoint's value."""
    try:
        wanted = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get("add_bos_token")
    except (OSError, ValueError):
        return
    if wanted is not True:
        return
    from transformers import AutoTokenizer
    original = model.set_vocab

    def set_vocab() -> None:
        load = AutoTokenizer.from_pretrained

        def loaded(*args: Any, **kwargs: Any) -> Any:
            tokenizer = load(*args, **kwargs)
            if not getattr(tokenizer, "add_bos_token", True):
                tokenizer.add_bos_token = True
            return tokenizer
        AutoTokenizer.from_pretrained = loaded
        try:
            original()
        finally:
            AutoTokenizer.from_pretrained = load

    model.set_vocab = set_vocab


def _rename_tensors(model: Any, renames: dict[str, str]) -> None:
    """Give the converter the checkpoint's tensors under the names it knows (the adapter's renames)."""
    tensors = model.model_tensors
    for old, new in renames.items():
        tensors[new] = tensors.pop(old)


def check_tokenizer(model_dir: Path) -> None:
    """The converter needs the tokenizer files; say so before any heavy work starts."""
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((model_dir / n).exists() for n in names):
        raise GemqError(f"{model_dir} has no tokenizer (none of {', '.join(names)}).",
                        "copy the tokenizer files of the original model into the checkpoint folder.")
    _check_merges(model_dir)


def _check_merges(model_dir: Path) -> None:
    """A BPE tokenizer without merges converts, but llama.cpp cannot tokenize with it."""
    fix = "copy the complete tokenizer files (tokenizer.json with its merges) of the original model."
    path = model_dir / "tokenizer.json"
    if path.exists():
        try:
            model = json.loads(path.read_text(encoding="utf-8")).get("model") or {}
        except (OSError, ValueError, AttributeError) as e:
            raise GemqError(f"{path} cannot be read ({e}).", fix) from None
        if model.get("type") == "BPE" and not model.get("merges"):
            raise GemqError(f"{path} is a BPE tokenizer without merges.", fix)
    elif (model_dir / "vocab.json").exists() and not (model_dir / "tokenizer.model").exists() \
            and not (model_dir / "merges.txt").exists():
        raise GemqError(f"{model_dir} has vocab.json but no merges.txt (a BPE tokenizer needs its merges).", fix)


def hf_to_float_gguf(model_dir: Path, out_path: Path, outtype: str = "f32", verbose: bool = False,
                     tied_output: bool = False) -> Path:
    """Convert a Hugging Face checkpoint to an unquantized GGUF at out_path (f32, f16 or bf16).

    tied_output: the checkpoint ties its embeddings and llama.cpp's loader needs output.weight: write the
    embedding as output.weight as well (what the tied model computes).
    """
    if outtype not in FLOAT_OUTTYPES:
        raise ValueError(f"outtype must be one of {FLOAT_OUTTYPES}")
    check_tokenizer(model_dir)
    conversion = import_converter()
    import gguf
    import torch

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype]
    hparams = conversion.ModelBase.load_hparams(model_dir, False)
    adapter = adapter_for(hparams["architectures"]) if any(
        a in supported() for a in hparams.get("architectures") or []) else None  # others convert as llama.cpp does
    if adapter is not None:  # may name the converter class too (`architectures`); a multimodal checkpoint's
        # converter reads its text_config merged over the top level (after some classes read the top level), so
        # the adapter's keys go to both (in the text_config only, a key the top level needs would be missing; at
        # the top only, the text_config's own value would replace it: Dots3Note's rope per layer kind)
        text = hparams.get("text_config") or {}
        extra = adapter.converter_hparams({**hparams, **text})
        hparams = {**hparams, **extra, **({"text_config": {**text, **extra}} if text else {})}
    arch = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    try:
        cls = conversion.get_model_class(arch)
    except NotImplementedError:
        raise GemqError(f"llama.cpp's converter does not support {arch}.", "use a supported architecture.") from None
    if cls.supports_mtp_export:
        # transformers loads no multi-token-prediction layers, so GEMQ has no statistics for them
        cls = type(cls.__name__, (cls,), {"model_arch": cls.model_arch, "no_mtp": True})
    logging.getLogger("hf-to-gguf").setLevel(logging.INFO if verbose else logging.WARNING)
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with torch.inference_mode(), sink:
        model = cls(model_dir, ftype, out_path, eager=False, hparams=hparams)
        _add_fallback(model, model_dir)
        _keep_add_bos_token(model, model_dir)
        if adapter is not None:
            _rename_tensors(model, adapter.converter_tensor_names(list(model.model_tensors)))
        _check_finite_on_write(model)
        if tied_output:
            _add_tied_output(model, model_dir)
        model.write()
    return out_path
