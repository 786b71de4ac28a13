"""Calibration and evaluation text shipped with the package (prose, technical prose, code, math)."""
from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).parent
DOMAINS = ("prose", "tech", "code", "math")


def _read(split: str) -> dict[str, str]:
    return {d: (DATA_DIR / split / f"{d}.txt").read_text(encoding="utf-8") for d in DOMAINS}


def calib_texts() -> dict[str, str]:
    """The built-in calibration corpus, one text per domain."""
    return _read("calib")


def eval_texts() -> dict[str, str]:
    """Held-out evaluation text, disjoint from the calibration text."""
    return _read("eval")
