"""Quality of a GGUF file against a reference GGUF, measured exactly the way `llama-perplexity` does.

Users compare quants by llama-perplexity's `--kl-divergence` numbers, so ours must be the same numbers,
not a look-alike. The Python backend replicates tools/perplexity/perplexity.cpp step by step: the
whole text is tokenized at once with BOS, cut into n_ctx chunks whose first token becomes BOS, and only
the second half of each chunk is scored. The reference's distributions go through the same 16-bit
log-prob encoding as llama-perplexity's `--kl-divergence-base` file (including its -16 cut-off), and
every float operation keeps llama's float32/double split. That file format is also our reference cache:
it streams chunk by chunk (memory stays at one chunk for any vocab size), can be reused for many test
files, and is interchangeable with the binary's own base files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from .data import eval_texts
from .errors import GemqError
from .runtime import bin_path

if TYPE_CHECKING:
    from llama_cpp import Llama

BASE_MAGIC = b"_logits_"
LOG_PROB_FLOOR = -16.0  # llama-perplexity ignores base probabilities below e^-16 in the KLD sum
_ROW_BLOCK = 32  # rows per numpy pass: bounds temporaries to 32 x n_vocab floats
_GGML_TYPE_F32 = 0


# ----------------------------------------------------------------------------------------- results

@dataclass
class EvalStats:
    """llama-perplexity's final KLD statistics for one text (or the token-weighted union of several)."""

    n_tokens: int
    n_chunks: int
    ppl: float
    ppl_unc: float
    ppl_base: float
    ppl_ratio: float
    ppl_ratio_unc: float
    kld_mean: float
    kld_mean_unc: float
    kld_median: float
    kld_p90: float
    kld_p95: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    same_top_p: float  # fraction of tokens whose argmax equals the reference's, 0..1
    same_top_p_unc: float
    rms_dp: float  # RMS of p(correct token) - p_base(correct token), 0..1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalResult:
    """Per-domain statistics plus their token-weighted total, with what produced them."""

    model: str
    ref: str
    ctx: int
    backend: str
    domains: dict[str, EvalStats]
    total: EvalStats
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "ref": self.ref, "ctx": self.ctx, "backend": self.backend,
                "settings": self.settings, "total": self.total.to_dict(),
                "domains": {k: v.to_dict() for k, v in self.domains.items()}}


@dataclass
class TokenScores:
    """Per scored token values; kept per token so totals and percentiles over domains stay exact."""

    nll: np.ndarray  # float32, -log q(token)
    nll_base: np.ndarray  # float32, -log p_base(token) from the 16-bit base encoding
    kld: np.ndarray  # float64, KL(p_base || q)
    p_diff: np.ndarray  # float32, q(token) - p_base(token)
    same_top: np.ndarray  # bool
    n_chunks: int

    @staticmethod
    def concat(parts: Sequence[TokenScores]) -> TokenScores:
        return TokenScores(*(np.concatenate([getattr(p, k) for p in parts])
                             for k in ("nll", "nll_base", "kld", "p_diff", "same_top")),
                           n_chunks=sum(p.n_chunks for p in parts))


@dataclass
class LogitsComparison:
    """Exact (float64, unquantized) agreement of two logit matrices over the same tokens."""

    n_tokens: int
    kld_mean: float
    kld_median: float
    kld_p99: float
    kld_max: float
    same_top_p: float
    max_abs_logprob_diff: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -------------------------------------------------------------------------------------- statistics

def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile: linear interpolation at fraction*(n-1), in float32 like the C++."""
    v = np.asarray(sorted_values, dtype=np.float32)
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = np.float32(fraction) * np.float32(len(v) - 1)
    ip = int(p)
    p = np.float32(p - np.float32(ip))
    return float((np.float32(1) - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)])


def median(sorted_values: np.ndarray) -> float:
    """llama-perplexity's median: mean of the two middle values for an even count, in float32."""
    v = np.asarray(sorted_values, dtype=np.float32)
    n = len(v)
    return float(v[n // 2] if n % 2 else np.float32(0.5) * (v[n // 2] + v[n // 2 - 1]))


def _mean_and_unc(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error as llama-perplexity computes them (0 for <= 10 values)."""
    n = len(values)
    x = values.astype(np.float64)
    f = float(x.sum() / n)
    var = float((x * x).sum() / n - f * f)
    return f, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def _covariance(a: np.ndarray, b: np.ndarray) -> float:
    n = len(a)
    if n < 10:
        return 0.0
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(((a64 * b64).sum() / n - (a64.sum() / n) * (b64.sum() / n)) / (n - 1))


def stats_from_scores(s: TokenScores) -> EvalStats:
    """The final block of llama-perplexity --kl-divergence, from per-token values."""
    n = len(s.nll)
    if n < 2:
        raise GemqError("Too few scored tokens for statistics.", "give more text or a smaller --ctx.")
    log_ppl, log_ppl_unc = _mean_and_unc(s.nll)
    log_base, log_base_unc = _mean_and_unc(s.nll_base)
    ratio_unc = math.sqrt(max(0.0, log_ppl_unc ** 2 + log_base_unc ** 2 - 2 * _covariance(s.nll, s.nll_base)))
    kld_mean, kld_unc = _mean_and_unc(s.kld)
    kld_sorted = np.sort(s.kld.astype(np.float32))
    mse, mse_unc = _mean_and_unc(s.p_diff.astype(np.float64) ** 2)
    top = float(s.same_top.sum()) / n
    ratio = math.exp(log_ppl - log_base)
    return EvalStats(
        n_tokens=n, n_chunks=s.n_chunks,
        ppl=math.exp(log_ppl), ppl_unc=math.exp(log_ppl) * log_ppl_unc, ppl_base=math.exp(log_base),
        ppl_ratio=ratio, ppl_ratio_unc=ratio * ratio_unc,
        kld_mean=kld_mean, kld_mean_unc=kld_unc, kld_median=median(kld_sorted),
        kld_p90=percentile(kld_sorted, 0.90), kld_p95=percentile(kld_sorted, 0.95),
        kld_p99=percentile(kld_sorted, 0.99), kld_p999=percentile(kld_sorted, 0.999),
        kld_max=float(kld_sorted[-1]), same_top_p=top, same_top_p_unc=math.sqrt(top * (1 - top) / (n - 1)),
        rms_dp=math.sqrt(mse),
    )


# ------------------------------------------------------------------ the 16-bit base log-prob encoding

@dataclass
class BaseChunk:
    """Reference log-probs of one chunk's scored rows: log p = scale * q + min_log_prob (float32)."""

    scale: np.ndarray  # float32 [n]
    min_log_prob: np.ndarray  # float32 [n]
    q: np.ndarray  # uint16 [n, n_vocab]

    def log_probs(self, rows: slice) -> np.ndarray:
        lp = self.q[rows].astype(np.float32)
        lp *= self.scale[rows, None]
        lp += self.min_log_prob[rows, None]
        return lp


def _max_and_log_sum_exp(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row max and log(sum expf(l - max)) with llama's expf-in-float, sum-in-double, log-to-float."""
    mx = logits.max(axis=1)
    e = np.subtract(logits, mx[:, None])
    np.exp(e, out=e)
    return mx, np.log(e.sum(axis=1, dtype=np.float64)).astype(np.float32)


def encode_log_probs(logits: np.ndarray) -> BaseChunk:
    """perplexity.cpp's log_softmax(..., uint16_t * log_prob, ...): 16-bit log-probs in a 16-nat window."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    n, n_vocab = logits.shape
    scale, min_lp = np.empty(n, np.float32), np.empty(n, np.float32)
    q = np.empty((n, n_vocab), np.uint16)
    for r in range(0, n, _ROW_BLOCK):
        blk = logits[r:r + _ROW_BLOCK]
        mx, lse = _max_and_log_sum_exp(blk)
        mn = np.maximum(blk.min(axis=1), mx - np.float32(16))
        min_lp[r:r + _ROW_BLOCK] = (mn - mx) - lse
        sc = (mx - mn) / np.float32(65535)
        scale[r:r + _ROW_BLOCK] = sc
        with np.errstate(divide="ignore"):
            inv = np.where(sc != 0, np.float32(1) / sc, np.float32(0)).astype(np.float32)
        d = np.subtract(blk, mn[:, None])
        np.maximum(d, 0, out=d)  # logits at or below the window's floor encode as 0
        d *= inv[:, None]
        q[r:r + _ROW_BLOCK] = np.rint(d, out=d)  # nearest_int(): round half to even
    return BaseChunk(scale, min_lp, q)


def score_chunk(logits: np.ndarray, base: BaseChunk, targets: np.ndarray) -> TokenScores:
    """perplexity.cpp's KLD log_softmax(): NLL, base NLL, KL(base || model), Δp and top-1 match per row."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    n = logits.shape[0]
    out = {k: np.empty(n, t) for k, t in (("nll", np.float32), ("nll_base", np.float32), ("kld", np.float64),
                                          ("p_diff", np.float32), ("same_top", bool))}
    for r in range(0, n, _ROW_BLOCK):
        rows = slice(r, min(r + _ROW_BLOCK, n))
        blk, tok = logits[rows], targets[rows]
        idx = np.arange(len(blk))
        mx, lse = _max_and_log_sum_exp(blk)
        nll = (mx + lse) - blk[idx, tok]
        lp_base = base.log_probs(rows)
        nll_base = -lp_base[idx, tok]
        p_base = np.exp(lp_base)
        p_base *= lp_base > np.float32(LOG_PROB_FLOOR)  # probabilities below e^-16 are left out
        terms = np.subtract(lp_base, blk)
        terms += (mx + lse)[:, None]
        terms *= p_base
        out["nll"][rows], out["nll_base"][rows] = nll, nll_base
        out["kld"][rows] = terms.sum(axis=1, dtype=np.float64)
        out["p_diff"][rows] = np.exp(-nll) - np.exp(-nll_base)
        out["same_top"][rows] = blk.argmax(axis=1) == lp_base.argmax(axis=1)
    return TokenScores(**out, n_chunks=1)


# ------------------------------------------------------------------------- base file (KLD-base) I/O

def _row_width(n_vocab: int) -> int:
    """uint16 slots per token row: two floats (scale, min log-prob) then the vocab, padded to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


@dataclass
class BaseFile:
    """A llama-perplexity `--kl-divergence-base` file, memory-mapped (read one chunk at a time)."""

    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray  # int32 [n_chunk * n_ctx], before BOS substitution

    @property
    def n_score(self) -> int:
        return self.n_ctx - 1 - self.n_ctx // 2

    @staticmethod
    def open(path: Path) -> BaseFile:
        with open(path, "rb") as f:
            if f.read(8) != BASE_MAGIC:
                raise GemqError(f"{path} is not a llama-perplexity log-prob file.",
                                "make it with --kl-divergence-base or gemq_gguf.evaluate.write_kld_base.")
            n_ctx, n_vocab, n_chunk = np.frombuffer(f.read(12), dtype="<i4").tolist()
        tokens = np.memmap(path, dtype="<i4", mode="r", offset=20, shape=(n_chunk * n_ctx,))
        return BaseFile(Path(path), n_ctx, n_vocab, n_chunk, tokens)

    def chunk(self, i: int) -> BaseChunk:
        nv = _row_width(self.n_vocab)
        offset = 20 + 4 * self.n_chunk * self.n_ctx + 2 * i * self.n_score * nv
        rows = np.memmap(self.path, dtype="<u2", mode="r", offset=offset, shape=(self.n_score, nv))
        head = np.ascontiguousarray(rows[:, :4]).view("<f4")
        return BaseChunk(head[:, 0].copy(), head[:, 1].copy(), np.asarray(rows[:, 4:4 + self.n_vocab]))


def _write_header(f: BinaryIO, n_ctx: int, n_vocab: int, tokens: np.ndarray) -> None:
    n_chunk = len(tokens) // n_ctx
    f.write(BASE_MAGIC + np.array([n_ctx, n_vocab, n_chunk], "<i4").tobytes())
    f.write(np.asarray(tokens, "<i4").tobytes())


def _write_chunk(f: BinaryIO, base: BaseChunk) -> None:
    n, n_vocab = base.q.shape
    rows = np.zeros((n, _row_width(n_vocab)), "<u2")
    rows[:, :4] = np.stack([base.scale, base.min_log_prob], axis=1).astype("<f4").view("<u2")
    rows[:, 4:4 + n_vocab] = base.q
    f.write(rows.tobytes())


def merge_base_files(parts: Sequence[Path], out: Path) -> Path:
    """Concatenate base files chunk-wise: chunks are independent, so the union scores like the parts."""
    bases = [BaseFile.open(p) for p in parts]
    if len({(b.n_ctx, b.n_vocab) for b in bases}) != 1:
        raise GemqError("Base files differ in context or vocabulary.", "make them with the same model and ctx.")
    with open(out, "wb") as f:
        _write_header(f, bases[0].n_ctx, bases[0].n_vocab, np.concatenate([b.tokens for b in bases]))
        for b in bases:
            with open(b.path, "rb") as src:
                src.seek(20 + 4 * len(b.tokens))
                shutil.copyfileobj(src, f)
    return out


# ---------------------------------------------------------------------------- running llama.cpp

@dataclass
class RunOptions:
    """How llama.cpp runs: CPU threads, KV cache type (F32 for exactness tests), offload, flash attention."""

    n_threads: int | None = None
    f32_kv: bool = False
    n_gpu_layers: int = 0
    flash_attn: bool = False

    def perplexity_args(self) -> list[str]:
        """The same settings as llama-perplexity flags."""
        args = ["-ngl", str(self.n_gpu_layers), "-fa", "on" if self.flash_attn else "off"]
        if self.n_threads:
            args += ["-t", str(self.n_threads)]
        if self.f32_kv:
            args += ["-ctk", "f32", "-ctv", "f32"]
        return args


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


# ------------------------------------------------------------------------------ the Python backend

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
        _write_header(f, ctx, ref.n_vocab(), tokens)
        for base in _base_chunks(ref, tokens, ctx, n_chunk):
            _write_chunk(f, base)
    tmp.replace(out)
    return BaseFile.open(out)


def _check_vocab(llm: Llama, n_vocab: int, what: str) -> None:
    if llm.n_vocab() != n_vocab:
        raise GemqError(f"{what} has a vocabulary of {llm.n_vocab()}, the reference {n_vocab}.",
                        "compare files of the same model.")


def score_against_base(llm: Llama, base: BaseFile) -> TokenScores:
    """What `llama-perplexity --kl-divergence` computes per token, from a base file."""
    _check_vocab(llm, base.n_vocab, "The model")
    parts = []
    for i in range(base.n_chunk):
        tokens = np.asarray(base.tokens[i * base.n_ctx:(i + 1) * base.n_ctx])
        logits = chunk_logits(llm, tokens, base.n_ctx)
        parts.append(score_chunk(logits, base.chunk(i), tokens[base.n_ctx // 2 + 1:]))
    return TokenScores.concat(parts)


def score_paired(llm: Llama, ref: Llama, text: str, ctx: int, max_chunks: int | None) -> TokenScores:
    """Reference and model side by side, chunk by chunk: nothing stored, both models in memory."""
    _check_vocab(llm, ref.n_vocab(), "The model")
    tokens = tokenize_like_perplexity(ref, text)
    n_chunk = n_chunks_for(len(tokens), ctx, max_chunks)
    parts = []
    for i, base in enumerate(_base_chunks(ref, tokens, ctx, n_chunk)):
        chunk = tokens[i * ctx:(i + 1) * ctx]
        parts.append(score_chunk(chunk_logits(llm, chunk, ctx), base, chunk[ctx // 2 + 1:]))
    return TokenScores.concat(parts)


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


def _python_scores(model_path: Path, ref_path: Path, texts: Mapping[str, str], ctx: int,
                   max_chunks: int | None, ref_cache_dir: Path | None, opts: RunOptions) -> dict[str, TokenScores]:
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


# ------------------------------------------------------------------------ the llama-perplexity backend

def find_llama_perplexity(explicit: Path | str | None = None) -> Path:
    """The built llama-perplexity: an explicit path, else our build (runtime.bin_path), else $PATH."""
    if explicit:
        return Path(explicit)
    try:
        return bin_path("llama-perplexity")
    except GemqError:
        found = shutil.which("llama-perplexity")
        if found is None:
            raise
        return Path(found)


def _run_binary(binary: Path, args: list[str]) -> str:
    proc = subprocess.run([str(binary), *args], capture_output=True, encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise GemqError(f"llama-perplexity failed (exit {proc.returncode}): {tail}", "see the message above.")
    return proc.stdout + proc.stderr


_STAT_LINES = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*(\S+)\s*±\s*(\S+)",
    "ppl_base": r"Mean PPL\(base\)\s*:\s*(\S+)",
    "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*(\S+)\s*±\s*(\S+)",
    "kld_mean": r"Mean\s+KLD:\s*(\S+)\s*±\s*(\S+)",
    "kld_max": r"Maximum KLD:\s*(\S+)",
    "kld_p999": r"99\.9%\s+KLD:\s*(\S+)",
    "kld_p99": r"99\.0%\s+KLD:\s*(\S+)",
    "kld_p95": r"95\.0%\s+KLD:\s*(\S+)",
    "kld_p90": r"90\.0%\s+KLD:\s*(\S+)",
    "kld_median": r"Median\s+KLD:\s*(\S+)",
    "rms_dp": r"RMS Δp\s*:\s*(\S+)",
    "same_top_p": r"Same top p:\s*(\S+)\s*±\s*(\S+)",
}
_PERCENT = {"rms_dp", "same_top_p"}


def parse_kld_output(output: str, n_tokens: int, n_chunks: int) -> EvalStats:
    """EvalStats from llama-perplexity --kl-divergence's final statistics (printed precision)."""
    values: dict[str, float] = {}
    for key, pattern in _STAT_LINES.items():
        m = re.search(pattern, output)
        if m is None:
            raise GemqError(f"llama-perplexity printed no '{key}' statistic (it needs >= 100 scored tokens,"
                            " and this llama.cpp can lose its last log lines at exit).",
                            "give more text; or build the tools with cpp_patch/build.py, whose logger flushes.")
        scale = 0.01 if key in _PERCENT else 1.0
        values[key] = float(m.group(1)) * scale
        if m.lastindex == 2:
            values[f"{key}_unc"] = float(m.group(2)) * scale
    values.pop("rms_dp_unc", None)
    return EvalStats(n_tokens=n_tokens, n_chunks=n_chunks, **values)


def binary_kld(binary: Path, model_path: Path, base: BaseFile, opts: RunOptions) -> EvalStats:
    """`llama-perplexity --kl-divergence` of model_path against a base file, parsed.

    The tools built by cpp_patch/build.py drain llama.cpp's async logger at exit (patch 0007); stock
    builds of this version can lose the final statistics on a busy machine, which parse_kld_output
    reports as such.
    """
    args = ["-m", str(model_path), "--kl-divergence-base", str(base.path), "--kl-divergence",
            "-c", str(base.n_ctx), "-b", str(base.n_ctx), *opts.perplexity_args()]
    return parse_kld_output(_run_binary(binary, args), base.n_chunk * base.n_score, base.n_chunk)


def binary_kld_base(binary: Path, ref_path: Path, text: str, out: Path, ctx: int, max_chunks: int | None,
                    opts: RunOptions) -> BaseFile:
    """`llama-perplexity -f TEXT --kl-divergence-base OUT` (the text goes through a file, as users run it)."""
    text_file = out.with_suffix(".txt")
    text_file.write_text(text, encoding="utf-8")
    chunks = ["--chunks", str(max_chunks)] if max_chunks is not None else []
    _run_binary(binary, ["-m", str(ref_path), "-f", str(text_file), "--kl-divergence-base", str(out),
                         "-c", str(ctx), "-b", str(ctx), *chunks, *opts.perplexity_args()])
    return BaseFile.open(out)


def _binary_result(binary: Path, model_path: Path, ref_path: Path, texts: Mapping[str, str], ctx: int,
                   max_chunks: int | None, opts: RunOptions) -> tuple[dict[str, EvalStats], EvalStats]:
    with tempfile.TemporaryDirectory(prefix="gemq-kld-") as tmp:
        bases = {d: binary_kld_base(binary, ref_path, t, Path(tmp) / f"{i}.kld", ctx, max_chunks, opts)
                 for i, (d, t) in enumerate(texts.items())}
        domains = {d: binary_kld(binary, model_path, b, opts) for d, b in bases.items()}
        if len(bases) == 1:
            return domains, next(iter(domains.values()))
        merged = BaseFile.open(merge_base_files([b.path for b in bases.values()], Path(tmp) / "all.kld"))
        return domains, binary_kld(binary, model_path, merged, opts)


# ------------------------------------------------------------------------------------- public API

def evaluate_gguf(model_path: Path | str, ref_path: Path | str, texts: Mapping[str, str], ctx: int = 512,
                  max_chunks: int | None = None, *, backend: str = "python", ref_cache_dir: Path | str | None = None,
                  opts: RunOptions | None = None, binary: Path | str | None = None) -> EvalResult:
    """PPL, KLD statistics and top-1 agreement of model_path vs ref_path on each text and on all of them.

    texts maps a domain name to its text; each is tokenized and chunked on its own, as one
    llama-perplexity run per file would. The total is the token-weighted union of the domains.
    Python backend: with ref_cache_dir, reference base files are cached there (reused across test
    files; disk ~ 2 bytes x vocab x scored tokens); without it, both models run side by side in memory.
    """
    if not texts:
        raise GemqError("No evaluation text was given.", "pass at least one text file.")
    model_path, ref_path, opts = Path(model_path), Path(ref_path), opts or RunOptions()
    for p in (model_path, ref_path):
        if not p.is_file():
            raise GemqError(f"{p} does not exist.", "check the path.")
    if backend == "python":
        cache = Path(ref_cache_dir) if ref_cache_dir is not None else None
        scores = _python_scores(model_path, ref_path, texts, ctx, max_chunks, cache, opts)
        domains = {d: stats_from_scores(s) for d, s in scores.items()}
        total = stats_from_scores(TokenScores.concat(list(scores.values())))
    elif backend == "llama-perplexity":
        domains, total = _binary_result(find_llama_perplexity(binary), model_path, ref_path, texts, ctx,
                                        max_chunks, opts)
    else:
        raise GemqError(f"Unknown backend {backend!r}.", "use 'python' or 'llama-perplexity'.")
    return EvalResult(model=str(model_path), ref=str(ref_path), ctx=ctx, backend=backend, domains=domains,
                      total=total, settings={"max_chunks": max_chunks, **asdict(opts)})


def kld_vs_logits(test_logits: Any, ref_logits: Any) -> LogitsComparison:
    """KL(ref || test) per row in float64 without any encoding: llama.cpp vs HF torch logits, say.

    Accepts numpy arrays or torch tensors of shape [n_tokens, n_vocab] (or [1, n, vocab]).
    """
    q = _as_2d_float64(test_logits)
    p = _as_2d_float64(ref_logits)
    if p.shape != q.shape:
        raise GemqError(f"Logit shapes differ: {q.shape} vs {p.shape}.", "compare the same tokens and vocab.")
    log_q = q - _logsumexp(q)
    log_p = p - _logsumexp(p)
    kld = np.sort((np.exp(log_p) * (log_p - log_q)).sum(axis=1))
    return LogitsComparison(
        n_tokens=len(kld), kld_mean=float(kld.mean()), kld_median=float(np.median(kld)),
        kld_p99=float(np.percentile(kld, 99)), kld_max=float(kld[-1]),
        same_top_p=float((q.argmax(axis=1) == p.argmax(axis=1)).mean()),
        max_abs_logprob_diff=float(np.abs(log_p - log_q).max()),
    )


def _as_2d_float64(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    return a.reshape(-1, a.shape[-1])


def _logsumexp(x: np.ndarray) -> np.ndarray:
    mx = x.max(axis=1, keepdims=True)
    return mx + np.log(np.exp(x - mx).sum(axis=1, keepdims=True))


# ------------------------------------------------------------------------------- output and CLI

_COLUMNS = (("tokens", "n_tokens", "{:d}"), ("PPL", "ppl", "{:.4f}"), ("PPL/ref", "ppl_ratio", "{:.4f}"),
            ("mean KLD", "kld_mean", "{:.6f}"), ("median", "kld_median", "{:.6f}"), ("p99 KLD", "kld_p99", "{:.6f}"),
            ("p99.9 KLD", "kld_p999", "{:.6f}"), ("same top", "same_top_p", "{:.3%}"))


def _cells(s: EvalStats) -> list[str]:
    return [fmt.format(getattr(s, key)) for _, key, fmt in _COLUMNS]


def print_result(result: EvalResult, file: Any = None) -> None:
    """A rich table: one row per domain and the token-weighted total."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{Path(result.model).name} vs {Path(result.ref).name} (ctx {result.ctx}, {result.backend})")
    table.add_column("domain")
    for header, _, _ in _COLUMNS:
        table.add_column(header, justify="right")
    for name, s in result.domains.items():
        table.add_row(name, *_cells(s))
    if len(result.domains) > 1:
        table.add_section()
        table.add_row("total", *_cells(result.total))
    console = Console(file=file)
    console.width = max(console.width, 120)  # never truncate numbers, even on a narrow or piped terminal
    console.print(table)


def read_texts(paths: Sequence[Path | str]) -> dict[str, str]:
    """Domain name (file stem) -> text, one entry per file."""
    texts: dict[str, str] = {}
    for p in map(Path, paths):
        if not p.is_file():
            raise GemqError(f"Text file {p} does not exist.", "check the path.")
        if p.stem in texts:
            raise GemqError(f"Two text files are named {p.stem}.", "give each domain file a distinct name.")
        texts[p.stem] = p.read_text(encoding="utf-8")
    return texts


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m gemq_gguf.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, help="GGUF file to judge")
    ap.add_argument("--ref", type=Path, required=True, help="reference GGUF (full precision)")
    ap.add_argument("--text", type=Path, nargs="+", default=None,
                    help="text files, one domain each (default: the packaged prose/tech/code/math eval text)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=None, help="at most this many chunks per file")
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    ap.add_argument("--backend", choices=("python", "llama-perplexity"), default="python")
    ap.add_argument("--ref-cache", type=Path, default=None, help="directory caching the reference's log-probs")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--f32-kv", action="store_true", help="F32 KV cache (exactness tests)")
    ap.add_argument("--llama-perplexity", type=Path, default=None, help="path of the llama-perplexity binary")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        texts = read_texts(args.text) if args.text else eval_texts()
        result = evaluate_gguf(args.model, args.ref, texts, args.ctx, args.chunks,
                               backend=args.backend, ref_cache_dir=args.ref_cache,
                               opts=RunOptions(n_threads=args.threads, f32_kv=args.f32_kv),
                               binary=args.llama_perplexity)
    except GemqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_result(result)
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
