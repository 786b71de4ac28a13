"""The Python backend: llama-cpp-python replicating tools/perplexity/perplexity.cpp step by step.

The whole text is tokenized at once with BOS, cut into n_ctx chunks whose first token becomes BOS, and
only the second half of each chunk is scored, as llama-perplexity does; the scoring itself is in
scores.py. The reference either runs side by side with the model (nothing stored) or is written once to
a base file (base_file.py) that is reused for every model tested against it.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import GemqError
from .base_file import BaseChunk, BaseFile, write_chunk, write_header
from .options import RunOptions
from .scores import TokenScores, encode_log_probs, score_chunk

if TYPE_CHECKING:
    from llama_cpp import Llama

_GGML_TYPE_F32 = 0


def open_llama(path: Path | str, ctx: int, opts: RunOptions) -> Llama:
    """A llama-cpp-python model whose context holds one chunk and returns logits for every position."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise GemqError("llama-cpp-python is not importable.", "run ./setup.sh to build it.") from e
    kv = {"type_k": _GGML_TYPE_F32, "type_v": _GGML_TYPE_F32} if opts.f32_kv else {}
    threads = {"n_threads": opts.n_threads, "n_threads_batch": opts.n_threads} if opts.n_threads else {}
    try:
        return Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                     n_gpu_layers=opts.n_gpu_layers, flash_attn=opts.flash_attn, verbose=False, **kv, **threads)
    except ValueError as e:
        raise GemqError(f"llama.cpp could not load {path} ({e}).",
                        "check the file; GEMQ mixed files need the patched llama-cpp-python.") from e


def tokenize_like_perplexity(llm: Llama, text: str) -> np.ndarray:
    """llama-perplexity's tokens: the -f file minus one trailing newline, with BOS, no special parsing."""
    if text.endswith("\n"):
        text = text[:-1]
    return np.asarray(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False), dtype=np.int32)


def n_chunks_for(n_tokens: int, ctx: int, max_chunks: int | None) -> int:
    """Whole n_ctx chunks, as llama-perplexity cuts them (it needs at least two)."""
    if n_tokens < 2 * ctx:
        raise GemqError(f"The text has {n_tokens} tokens; context {ctx} needs at least {2 * ctx}.",
                        "give more text or a smaller --ctx.")
    n = n_tokens // ctx
    return n if max_chunks is None else min(n, max_chunks)


def chunk_logits(llm: Llama, tokens: np.ndarray, ctx: int) -> np.ndarray:
    """Logits of one chunk's scored rows (positions ctx/2 .. ctx-2), the chunk's first token made BOS."""
    chunk = tokens.tolist()
    if llm._model.add_bos_token():
        chunk[0] = llm.token_bos()
    llm.reset()
    llm.eval(chunk)
    return llm.scores[ctx // 2:ctx - 1]


def llama_logits(model_path: Path | str, tokens: Sequence[int], opts: RunOptions | None = None) -> np.ndarray:
    """llama.cpp's logits for every position of one sequence (no BOS added): for exactness tests vs HF."""
    llm = open_llama(model_path, len(tokens), opts or RunOptions(f32_kv=True))
    try:
        llm.eval(list(tokens))
        return np.array(llm.scores[:len(tokens)])
    finally:
        llm.close()


def _base_chunks(llm: Llama, tokens: np.ndarray, ctx: int, n_chunk: int) -> Iterator[BaseChunk]:
    for i in range(n_chunk):
        yield encode_log_probs(chunk_logits(llm, tokens[i * ctx:(i + 1) * ctx], ctx))


def write_kld_base(ref: Llama, text: str, out: Path, ctx: int = 512, max_chunks: int | None = None) -> BaseFile:
    """What `llama-perplexity -m REF -f TEXT --kl-divergence-base OUT` writes, streamed chunk by chunk."""
    tokens = tokenize_like_perplexity(ref, text)
    n_chunk = n_chunks_for(len(tokens), ctx, max_chunks)
    tokens = tokens[:n_chunk * ctx]
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "wb") as f:
        write_header(f, ctx, ref.n_vocab(), tokens)
        for base in _base_chunks(ref, tokens, ctx, n_chunk):
            write_chunk(f, base)
    tmp.replace(out)
    return BaseFile.open(out)


def _check_vocab(llm: Llama, n_vocab: int, what: str) -> None:
    if llm.n_vocab() != n_vocab:
        raise GemqError(f"{what} has a vocabulary of {llm.n_vocab()}, the reference {n_vocab}.",
                        "compare files of the same model.")


def _score_chunk_of(llm: Llama, tokens: np.ndarray, base: BaseChunk, ctx: int) -> TokenScores:
    """One chunk's scores: the model's logits against the reference's, each row predicting the next token."""
    return score_chunk(chunk_logits(llm, tokens, ctx), base, tokens[ctx // 2 + 1:])


def score_against_base(llm: Llama, base: BaseFile) -> TokenScores:
    """What `llama-perplexity --kl-divergence` computes per token, from a base file."""
    _check_vocab(llm, base.n_vocab, "The model")
    return TokenScores.concat([_score_chunk_of(llm, base.chunk_tokens(i), base.chunk(i), base.n_ctx)
                               for i in range(base.n_chunk)])


def score_paired(llm: Llama, ref: Llama, text: str, ctx: int, max_chunks: int | None) -> TokenScores:
    """Reference and model side by side, chunk by chunk: nothing stored, both models in memory."""
    _check_vocab(llm, ref.n_vocab(), "The model")
    tokens = tokenize_like_perplexity(ref, text)
    n_chunk = n_chunks_for(len(tokens), ctx, max_chunks)
    return TokenScores.concat([_score_chunk_of(llm, tokens[i * ctx:(i + 1) * ctx], base, ctx)
                               for i, base in enumerate(_base_chunks(ref, tokens, ctx, n_chunk))])


def _cache_name(ref_path: Path, domain: str, text: str, ctx: int, max_chunks: int | None) -> str:
    """Base files are keyed by the reference file's identity, the text and the chunking."""
    st = ref_path.stat()
    key = f"{ref_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{ctx}|{max_chunks}|"
    digest = hashlib.sha256(key.encode() + text.encode("utf-8")).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', domain)}-{digest}.kld"


def cached_kld_base(ref_path: Path, domain: str, text: str, ctx: int, max_chunks: int | None,
                    cache_dir: Path, opts: RunOptions) -> BaseFile:
    """The reference's base file for this text, computed once and reused for every test file."""
    out = Path(cache_dir) / _cache_name(Path(ref_path), domain, text, ctx, max_chunks)
    if out.exists():
        return BaseFile.open(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ref = open_llama(ref_path, ctx, opts)
    try:
        return write_kld_base(ref, text, out, ctx, max_chunks)
    finally:
        ref.close()


def python_scores(model_path: Path, ref_path: Path, texts: Mapping[str, str], ctx: int,
                  max_chunks: int | None, ref_cache_dir: Path | None, opts: RunOptions) -> dict[str, TokenScores]:
    """Per-domain token scores: against cached base files with ref_cache_dir, else both models side by side."""
    with ExitStack() as stack:
        if ref_cache_dir is not None:
            bases = {d: cached_kld_base(ref_path, d, t, ctx, max_chunks, ref_cache_dir, opts) for d, t in texts.items()}
            llm = open_llama(model_path, ctx, opts)
            stack.callback(llm.close)
            return {d: score_against_base(llm, b) for d, b in bases.items()}
        ref = open_llama(ref_path, ctx, opts)
        stack.callback(ref.close)
        llm = open_llama(model_path, ctx, opts)
        stack.callback(llm.close)
        return {d: score_paired(llm, ref, t, ctx, max_chunks) for d, t in texts.items()}
