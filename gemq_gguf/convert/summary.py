"""The closing table of a conversion: tensor counts per type, size, whole-file and expert bpw."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .writer import WriteSummary


def print_summary(s: WriteSummary, verified: str | None = None, console: Console | None = None,
                  target: str | None = None) -> None:
    """The table, then one line each: sizes, the file target (--target-bpw / --target-size), the
    verification, fallbacks."""
    console = console or Console(stderr=True)
    t = Table(title=f"{s.path}", show_lines=False)
    t.add_column("type")
    t.add_column("tensors", justify="right")
    t.add_column("expert matrices", justify="right")
    for name in sorted(set(s.type_counts) | set(s.expert_type_counts)):
        t.add_row(name, str(s.type_counts.get(name, 0)), str(s.expert_type_counts.get(name, 0)))
    console.print(t)
    console.print(f"file {s.file_bytes / 2**20:,.1f} MiB | whole-file {s.file_bpw:.3f} bpw | routed experts "
                  f"{s.expert_bpw:.3f} bpw ({s.expert_params / max(s.total_params, 1):.0%} of the weights) | "
                  f"{s.grouped} grouped expert tensors")
    if target:
        console.print(target)
    if verified:
        console.print(verified)
    for msg in s.fallbacks[:5]:
        console.print(f"[yellow]fallback[/] {msg}")
    if len(s.fallbacks) > 5:
        console.print(f"[yellow]... and {len(s.fallbacks) - 5} more fallbacks (see the JSON report)[/]")
