"""llama-perplexity's `--kl-divergence-base` file: the reference's 16-bit log-probs, chunk by chunk.

We write and read the binary's own format, so base files made by either side are interchangeable, and
use it as our reference cache: it streams one chunk at a time (memory stays at one chunk for any vocab
size) and can be reused for every file tested against the same reference and text.

Layout: magic, then int32 n_ctx, n_vocab, n_chunk, then the int32 tokens of all chunks, then per chunk
its scored rows (positions n_ctx/2 .. n_ctx-2), each row two float32 (scale, min log-prob) followed by
the vocab's uint16 codes, padded to an even count.
"""
from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import GemqError

BASE_MAGIC = b"_logits_"
_HEADER_BYTES = len(BASE_MAGIC) + 12  # magic and three int32


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

    @property
    def _rows_offset(self) -> int:
        return _HEADER_BYTES + 4 * len(self.tokens)

    @staticmethod
    def open(path: Path) -> BaseFile:
        with open(path, "rb") as f:
            if f.read(len(BASE_MAGIC)) != BASE_MAGIC:
                raise GemqError(f"{path} is not a llama-perplexity log-prob file.",
                                "make it with --kl-divergence-base or gemq_gguf.evaluate.write_kld_base.")
            n_ctx, n_vocab, n_chunk = np.frombuffer(f.read(12), dtype="<i4").tolist()
        tokens = np.memmap(path, dtype="<i4", mode="r", offset=_HEADER_BYTES, shape=(n_chunk * n_ctx,))
        return BaseFile(Path(path), n_ctx, n_vocab, n_chunk, tokens)

    def chunk_tokens(self, i: int) -> np.ndarray:
        """Chunk i's n_ctx tokens as stored (its first token is not yet BOS)."""
        return np.asarray(self.tokens[i * self.n_ctx:(i + 1) * self.n_ctx])

    def chunk(self, i: int) -> BaseChunk:
        nv = _row_width(self.n_vocab)
        offset = self._rows_offset + 2 * i * self.n_score * nv
        rows = np.memmap(self.path, dtype="<u2", mode="r", offset=offset, shape=(self.n_score, nv))
        head = np.ascontiguousarray(rows[:, :4]).view("<f4")
        return BaseChunk(head[:, 0].copy(), head[:, 1].copy(), np.asarray(rows[:, 4:4 + self.n_vocab]))


def write_header(f: BinaryIO, n_ctx: int, n_vocab: int, tokens: np.ndarray) -> None:
    """The header and all chunks' tokens; the chunks' rows follow with write_chunk, in order."""
    n_chunk = len(tokens) // n_ctx
    f.write(BASE_MAGIC + np.array([n_ctx, n_vocab, n_chunk], "<i4").tobytes())
    f.write(np.asarray(tokens, "<i4").tobytes())


def write_chunk(f: BinaryIO, base: BaseChunk) -> None:
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
        write_header(f, bases[0].n_ctx, bases[0].n_vocab, np.concatenate([b.tokens for b in bases]))
        for b in bases:
            with open(b.path, "rb") as src:
                src.seek(b._rows_offset)
                shutil.copyfileobj(src, f)
    return out
