"""Per-token scores and their statistics, computed the way llama-perplexity computes them.

Users compare quants by llama-perplexity's `--kl-divergence` numbers, so ours must be the same numbers,
not a look-alike: the reference's distributions go through the same 16-bit log-prob encoding as its base
file (including the -16 cut-off), every float operation keeps llama's float32/double split, and the
final statistics (uncertainties, percentiles, median) follow perplexity.cpp. Values are kept per token
so totals and percentiles over several texts stay exact. kld_vs_logits is the unencoded float64
comparison for exactness tests (llama.cpp vs HF torch).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import GemqError
from .base_file import BaseChunk

LOG_PROB_FLOOR = -16.0  # llama-perplexity ignores base probabilities below e^-16 in the KLD sum
_ROW_BLOCK = 32  # rows per numpy pass: bounds temporaries to 32 x n_vocab floats


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
    mse, _ = _mean_and_unc(s.p_diff.astype(np.float64) ** 2)
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


# ----------------------------------------------------------- per-token scores in llama's arithmetic

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


# --------------------------------------------------------------- exact comparison, no 16-bit encoding

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
        x = x.detach().double().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    return a.reshape(-1, a.shape[-1])


def _logsumexp(x: np.ndarray) -> np.ndarray:
    mx = x.max(axis=1, keepdims=True)
    return mx + np.log(np.exp(x - mx).sum(axis=1, keepdims=True))
