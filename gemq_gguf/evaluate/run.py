"""evaluate_gguf, the entry point: check the inputs, run one backend over every text, return and print results."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GemqError
from .options import RunOptions
from .perplexity_backend import binary_result, find_llama_perplexity
from .python_backend import python_scores
from .scores import EvalStats, TokenScores, stats_from_scores


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
        scores = python_scores(model_path, ref_path, texts, ctx, max_chunks, cache, opts)
        domains = {d: stats_from_scores(s) for d, s in scores.items()}
        total = stats_from_scores(TokenScores.concat(list(scores.values())))
    elif backend == "llama-perplexity":
        domains, total = binary_result(find_llama_perplexity(binary), model_path, ref_path, texts, ctx,
                                       max_chunks, opts)
    else:
        raise GemqError(f"Unknown backend {backend!r}.", "use 'python' or 'llama-perplexity'.")
    return EvalResult(model=str(model_path), ref=str(ref_path), ctx=ctx, backend=backend, domains=domains,
                      total=total, settings={"max_chunks": max_chunks, **asdict(opts)})


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
