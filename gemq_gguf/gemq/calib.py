"""Calibration tokens: seeded windows from a weighted mixture of text domains.

GEMQ's costs are only as good as the text they are measured on, and which experts matter depends
on the domain (task-aware quantization), so users mix domains with weights: `--calib FILE[:WEIGHT]`.
The default is the packaged corpus (prose, technical prose, code, math) with equal weights.
Every window is exactly `seq_len` tokens, so the share of tokens per domain is the share of windows,
assigned by largest remainder: the requested weights are met as closely as whole windows allow.
Windows are cut from random character spans (tokenizing only what is needed, so a large file
costs little), starting at a line or word boundary.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data import calib_texts
from ..errors import GemqError

DEFAULT_TOKENS = 32768
DEFAULT_SEQ_LEN = 512
_CHARS_PER_TOKEN = 6  # generous first guess of a span's length; doubled when too short


@dataclass(frozen=True)
class CalibSource:
    """One domain of the mixture: its name (file path or packaged domain), text and weight."""

    name: str
    text: str
    weight: float


def parse_spec(spec: str) -> tuple[Path, float]:
    """'FILE' or 'FILE:WEIGHT' -> (path, weight); a path that exists as written is never split."""
    if Path(spec).exists() or ":" not in spec:
        return Path(spec), 1.0
    path, raw = spec.rsplit(":", 1)
    try:
        weight = float(raw)
    except ValueError:
        raise GemqError(f"--calib '{spec}': '{raw}' is not a number and '{spec}' is not a file.",
                        "write FILE or FILE:WEIGHT, e.g. code.jsonl:2.") from None
    return Path(path), weight


def read_text(path: Path) -> str:
    """Plain text, or JSON lines with a 'text' field (documents joined by blank lines)."""
    if not path.is_file():
        raise GemqError(f"calibration file {path} does not exist.", "pass an existing text or .jsonl file to --calib.")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise GemqError(f"{path} line {i} is not JSON ({e.msg}).", "give one JSON object per line.") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise GemqError(f"{path} line {i} has no string 'text' field.",
                                "give JSON lines like {\"text\": \"...\"}.")
            docs.append(rec["text"])
        raw = "\n\n".join(docs)
    if not raw.strip():
        raise GemqError(f"calibration file {path} is empty.", "pass a file with text in it.")
    return raw


def load_sources(specs: Sequence[str] | None = None) -> list[CalibSource]:
    """The mixture named by `--calib` specs, or the packaged corpus with equal weights."""
    if not specs:
        return [CalibSource(f"builtin:{d}", t, 1.0) for d, t in calib_texts().items()]
    sources = []
    for spec in specs:
        path, weight = parse_spec(spec)
        if not (math.isfinite(weight) and weight > 0):
            raise GemqError(f"--calib '{spec}': the weight must be a positive number.", "use e.g. FILE:0.5.")
        sources.append(CalibSource(str(path), read_text(path), weight))
    return sources


def split_windows(weights: Sequence[float], n_seq: int) -> list[int]:
    """Windows per source, proportional to weights by largest remainder (sums to n_seq)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * n_seq
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n_seq - counts.sum()]] += 1
    return counts.tolist()


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _boundary(text: str, pos: int) -> int:
    """First position after `pos` that starts a line (or a word), so windows do not start mid-word."""
    nl = text.find("\n", pos, pos + 2000)
    if nl >= 0:
        return nl + 1
    sp = text.find(" ", pos, pos + 200)
    return sp + 1 if sp >= 0 else pos


def sample_window(tokenizer: Any, src: CalibSource, n_tokens: int, rng: np.random.Generator) -> list[int]:
    """`n_tokens` consecutive tokens from a random place in the source text."""
    span = n_tokens * _CHARS_PER_TOKEN
    while True:
        if span >= len(src.text):
            ids = _encode(tokenizer, src.text)
            if len(ids) < n_tokens:
                raise GemqError(f"calibration text {src.name} has only {len(ids)} tokens; a window needs {n_tokens}.",
                                "give more text, or lower --seq-len.")
            start = int(rng.integers(0, len(ids) - n_tokens + 1))
            return ids[start:start + n_tokens]
        start = _boundary(src.text, int(rng.integers(0, len(src.text) - span + 1)))
        ids = _encode(tokenizer, src.text[start:start + span])
        if len(ids) > n_tokens:  # the span's last token may be cut by the span end: drop it
            return ids[:n_tokens]
        span *= 2


def calibration_tokens(tokenizer: Any, specs: Sequence[str] | None = None, n_tokens: int = DEFAULT_TOKENS,
                       seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0) -> torch.Tensor:
    """LongTensor [n_seq, seq_len] of token ids; n_seq = ceil(n_tokens / seq_len), rows grouped by source.

    Each row starts with the special tokens the tokenizer puts before a document (e.g. BOS), as the
    model sees text at inference time.
    """
    if n_tokens <= 0 or seq_len <= 1:
        raise GemqError(f"--calib-tokens {n_tokens} / --seq-len {seq_len} is too small.",
                        "use at least one window of 2 or more tokens.")
    sources = load_sources(specs)
    n_seq = math.ceil(n_tokens / seq_len)
    prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])
    if len(prefix) >= seq_len:
        raise GemqError(f"--seq-len {seq_len} leaves no room after the tokenizer's {len(prefix)} special tokens.",
                        "use a longer --seq-len.")
    rng = np.random.default_rng(seed)
    rows = []
    for src, count in zip(sources, split_windows([s.weight for s in sources], n_seq)):
        rows.extend(prefix + sample_window(tokenizer, src, seq_len - len(prefix), rng) for _ in range(count))
    return torch.tensor(rows, dtype=torch.long)

