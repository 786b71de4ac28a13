"""`--budget` conversions of a tiny model with and without the statistics cache (the cache tests compare
their bytes)."""
from __future__ import annotations

from pathlib import Path

from gemq_gguf.cli import main as convert_main


def uncached_run(model: Path, out: Path, args: tuple[str, ...]) -> bytes:
    """`--budget 3.5 --no-cache`: the bytes every cached run at 3.5 must reproduce."""
    assert convert_main([str(model), "--budget", "3.5", "--no-cache", "-o", str(out), *args]) == 0
    return out.read_bytes()


def cached_run(model: Path, out: Path, cache: Path, budget_bpw: str, args: tuple[str, ...], *extra: str) -> bytes:
    assert convert_main([str(model), "--budget", budget_bpw, "--cache-dir", str(cache), "-o", str(out), *args,
                         *extra]) == 0
    return out.read_bytes()
