"""The last step of a conversion: the written file loads in the patched llama.cpp and computes what the
model computes.

The converter otherwise never runs what it wrote (a tied-embedding checkpoint once converted into a file
llama.cpp refuses). The reference is the float GGUF of stage 1, the unquantized model as llama.cpp runs it:
cheaper than the Hugging Face model (no torch load; it is on disk already) and exact, since both files go
through the same runtime, tokenizer and chunking. Scores come from gemq_gguf.evaluate, so they are what
`python -m gemq_gguf.evaluate OUT --ref FLOAT --text TEXT --ctx CTX --chunks N` prints on the same text.
A NaN or Inf in any scored logit of either file makes the mean KLD or the perplexity non-finite.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import GemqError
from .evaluate import EvalStats, RunOptions, evaluate_gguf, open_llama
from .options import VerifyOptions

#: characters of calibration text per verification token: 8 is about twice what BPE tokenizers need on
#: English prose and code, so the text holds the chunks asked for (fewer chunks are scored otherwise)
_CHARS_PER_TOKEN = 8


@dataclass(frozen=True)
class Verification:
    """What the check measured, for the summary line and the JSON report."""

    kld_mean: float
    kld_max: float
    same_top_p: float
    ppl: float
    ppl_base: float
    n_tokens: int
    ctx: int
    n_chunks: int
    text_sha256: str
    kld_limit: float  # the mean KLD above which the file is refused

    @property
    def finite(self) -> bool:
        return all(math.isfinite(x) for x in (self.kld_mean, self.ppl, self.ppl_base))

    def line(self) -> str:
        return (f"verified in llama.cpp against the unquantized model on {self.n_tokens} calibration tokens: "
                f"mean KLD {self.kld_mean:.4f}, same top-1 {self.same_top_p:.1%}, PPL {self.ppl:.3f} "
                f"(unquantized {self.ppl_base:.3f})")

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "finite": self.finite}


def verification_text(sources: Sequence[tuple[str, float]], opts: VerifyOptions) -> str:
    """The start of each calibration text, in proportion to its weight, joined: deterministic and cheap.

    `sources` are (text, weight) pairs; the chunks are cut from the joined text in order.
    """
    from .gemq.calib import split_windows
    counts = split_windows([w for _, w in sources], opts.chunks)
    return "\n\n".join(t[:n * opts.ctx * _CHARS_PER_TOKEN] for (t, _), n in zip(sources, counts) if n)


def _check_loads(path: Path, what: str, opts: VerifyOptions) -> int:
    """Load alone first, so a failure names the file that does not load; returns the vocabulary size."""
    try:
        llm = open_llama(path, opts.ctx, RunOptions())
        n_vocab = llm.n_vocab()
        llm.close()
        return n_vocab
    except GemqError as e:
        raise GemqError(f"verification failed: llama.cpp cannot load {what} {path.name} "
                        f"({str(e.__cause__ or e.problem)}).",
                        "the written file was removed; report this as a bug with the command line.") from None


def verify_file(path: Path, reference: Path, text: str, opts: VerifyOptions, cache_dir: Path) -> Verification:
    """Score `path` against `reference` on `text`; a GemqError when it does not load or is off by far."""
    n_vocab = _check_loads(path, "the written file", opts)
    limit = opts.max_kld if opts.max_kld is not None else math.log(n_vocab)
    _check_loads(reference, "the unquantized model (stage 1's float GGUF, written by llama.cpp's converter)", opts)
    try:
        result = evaluate_gguf(path, reference, {"calibration": text}, opts.ctx, opts.chunks,
                               ref_cache_dir=cache_dir)
    except GemqError as e:
        raise GemqError(f"verification failed: {e.problem}",
                        "the written file was removed; report this as a bug with the command line.") from None
    except (RuntimeError, ValueError, OSError) as e:  # llama-cpp-python's decode and load failures
        raise GemqError(f"verification failed: llama.cpp could not run {path.name} ({e}).",
                        "the written file was removed; report this as a bug with the command line.") from None
    s: EvalStats = result.total
    v = Verification(kld_mean=s.kld_mean, kld_max=s.kld_max, same_top_p=s.same_top_p, ppl=s.ppl, ppl_base=s.ppl_base,
                     n_tokens=s.n_tokens, ctx=opts.ctx, n_chunks=s.n_chunks,
                     text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(), kld_limit=limit)
    if not v.finite:
        raise GemqError(f"verification failed: {path.name} gives non-finite logits in llama.cpp "
                        f"(mean KLD {v.kld_mean}, PPL {v.ppl}).",
                        "the written file was removed; report this as a bug with the command line.")
    if v.kld_mean > limit:
        raise GemqError(f"verification failed: {path.name} is far from the unquantized model (mean KLD "
                        f"{v.kld_mean:.3f} > {limit:.3g}, worse than a uniform guess; same top-1 {v.same_top_p:.0%}).",
                        "the written file was removed; report this as a bug, or pass --no-verify to keep it.")
    return v
