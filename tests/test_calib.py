"""Calibration text: mixtures meet their token shares, sampling is seeded, bad input is a clear error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemq_gguf.errors import GemqError
from gemq_gguf.gemq.calib import (
    calibration_tokens,
    load_sources,
    parse_spec,
    split_windows,
)


class CharTokenizer:
    """One token per character (its code point), optionally with a BOS before each document."""

    def __init__(self, bos: int | None = None) -> None:
        self.bos = bos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ord(c) for c in text]
        return {"input_ids": ([self.bos] if add_special_tokens and self.bos is not None else []) + ids}


def _file(tmp: Path, name: str, text: str) -> str:
    p = tmp / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_mixture_weights_give_token_shares(tmp_path: Path) -> None:
    a = _file(tmp_path, "a.txt", "a a a\n" * 2000)
    b = _file(tmp_path, "b.jsonl", "\n".join(json.dumps({"text": "b b b b\n" * 50}) for _ in range(40)))
    toks = calibration_tokens(CharTokenizer(), [f"{a}:3", f"{b}:1"], n_tokens=64 * 16, seq_len=64, seed=1)
    assert toks.shape == (16, 64)
    from_a = (toks == ord("a")).any(dim=1)
    assert not ((toks == ord("b")).any(dim=1) & from_a).any()  # every window comes from one source
    assert from_a.sum() * 64 / toks.numel() == 0.75  # 3:1 by tokens, exactly


def test_split_windows_largest_remainder() -> None:
    assert split_windows([1, 1, 1, 1], 64) == [16, 16, 16, 16]
    assert split_windows([2, 1], 10) == [7, 3]
    assert sum(split_windows([0.3, 0.3, 0.4], 7)) == 7


def test_seeded_and_default_corpus() -> None:
    tok = CharTokenizer(bos=0)
    one = calibration_tokens(tok, None, n_tokens=4 * 256, seq_len=256, seed=7)
    two = calibration_tokens(tok, None, n_tokens=4 * 256, seq_len=256, seed=7)
    other = calibration_tokens(tok, None, n_tokens=4 * 256, seq_len=256, seed=8)
    assert one.equal(two) and not one.equal(other)
    assert one.shape == (4, 256) and (one[:, 0] == 0).all()  # the tokenizer's BOS starts every window
    assert [s.name for s in load_sources(None)] == ["builtin:prose", "builtin:tech", "builtin:code", "builtin:math"]


def test_spec_parsing(tmp_path: Path) -> None:
    assert parse_spec("x.txt:2.5") == (Path("x.txt"), 2.5)
    assert parse_spec("x.txt") == (Path("x.txt"), 1.0)
    odd = _file(tmp_path, "odd:name.txt", "text")
    assert parse_spec(odd) == (Path(odd), 1.0)


@pytest.mark.parametrize("spec, what", [
    ("{missing}", "does not exist"), ("{empty}", "is empty"), ("{text}:0", "positive"),
    ("{text}:-1", "positive"), ("{text}:abc", "not a number"), ("{badjson}", "not JSON"), ("{notext}", "'text'"),
])
def test_bad_input_is_a_clear_error(tmp_path: Path, spec: str, what: str) -> None:
    files = {"missing": str(tmp_path / "nope.txt"), "empty": _file(tmp_path, "e.txt", "  \n"),
             "text": _file(tmp_path, "t.txt", "hello world\n" * 100), "badjson": _file(tmp_path, "b.jsonl", "{oops\n"),
             "notext": _file(tmp_path, "n.jsonl", json.dumps({"content": "x"}) + "\n")}
    with pytest.raises(GemqError, match=what):
        calibration_tokens(CharTokenizer(), [spec.format(**files)], n_tokens=64, seq_len=32)


def test_text_shorter_than_a_window(tmp_path: Path) -> None:
    short = _file(tmp_path, "s.txt", "tiny")
    with pytest.raises(GemqError, match="only 4 tokens"):
        calibration_tokens(CharTokenizer(), [short], n_tokens=64, seq_len=32)
