"""The llama-perplexity backend: run the built binary itself and parse its printed statistics.

This is the ground truth the Python backend is tested against, and the way to get the numbers with
exactly the user's tools; it prints statistics at fixed precision and keeps no per-token values, so
the union of several texts is scored again from a merged base file.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ..errors import GemqError
from ..runtime import bin_path
from .base_file import BaseFile, merge_base_files
from .options import RunOptions
from .scores import EvalStats


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


def binary_result(binary: Path, model_path: Path, ref_path: Path, texts: Mapping[str, str], ctx: int,
                  max_chunks: int | None, opts: RunOptions) -> tuple[dict[str, EvalStats], EvalStats]:
    """Per-domain statistics and the total, from one base file per text and their merge (temporary files)."""
    with tempfile.TemporaryDirectory(prefix="gemq-kld-") as tmp:
        bases = {d: binary_kld_base(binary, ref_path, t, Path(tmp) / f"{i}.kld", ctx, max_chunks, opts)
                 for i, (d, t) in enumerate(texts.items())}
        domains = {d: binary_kld(binary, model_path, b, opts) for d, b in bases.items()}
        if len(bases) == 1:
            return domains, next(iter(domains.values()))
        merged = BaseFile.open(merge_base_files([b.path for b in bases.values()], Path(tmp) / "all.kld"))
        return domains, binary_kld(binary, model_path, merged, opts)
