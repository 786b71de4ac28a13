"""Wall and CPU seconds of each stage of one conversion (the demo command by default).

The stage functions are wrapped with timers (in the module namespaces the pipeline calls them from) and
the conversion runs in this process through the CLI. CPU is the process's user+sys time (every thread:
torch's and the quantization pool's), so on a shared machine compare CPU, not wall. Nested stages
(imatrix accumulation, tensor recording inside calibration) are also counted in their parent.

    python bench/convert_stages.py demo --budget 3.0 --calib-tokens 4096 -o /tmp/d.gguf --cache-dir /tmp/c
"""
from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

TOTALS: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
_depth: dict[str, int] = defaultdict(int)


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` adding its wall and CPU seconds to TOTALS[name] (a recursive call counts once)."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _depth[name]:
            return fn(*args, **kwargs)
        _depth[name] += 1
        w, c = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            _depth[name] -= 1
            t = TOTALS[name]
            t[0] += time.perf_counter() - w
            t[1] += time.process_time() - c
            t[2] += 1
    return wrapper


def patch(module: Any, attr: str, name: str) -> None:
    setattr(module, attr, timed(name, getattr(module, attr)))


def install() -> None:
    """Wrap the stages where their callers look them up."""
    from gemq_gguf import pipeline
    from gemq_gguf.gemq import budget, cache, stats, tensor_stats
    patch(pipeline, "hf_to_float_gguf", "stage 1: HF -> float GGUF")
    patch(budget, "calib_tokens", "tokenize calibration text")
    patch(budget, "load_for_calibration", "load HF model")
    patch(budget, "collect_stats", "calibration forward+backward (all)")
    patch(budget, "stream_stats", "calibration forward+backward (all)")
    patch(stats, "_accumulate_imatrix", "  expert imatrix accumulation")
    patch(tensor_stats.TensorRecorder, "linear_hook", "  non-expert recording (forward hooks)")
    patch(tensor_stats.TensorRecorder, "embedding_hook", "  non-expert recording (forward hooks)")
    patch(cache.CalibEntry, "save", "cache: save statistics")
    patch(budget, "estimate_costs", "expert cost pass")
    patch(budget, "solve", "solve allocation")
    patch(budget, "plot_heatmap", "heatmap")
    patch(pipeline, "write_gguf", "write typed GGUF")
    patch(pipeline, "_verify", "verify in llama.cpp")
    from gemq_gguf.gemq import tensor_costs
    patch(tensor_costs, "tensor_cost_table", "non-expert cost table")


def main() -> int:
    install()
    from gemq_gguf.cli import main as cli_main
    w, c = time.perf_counter(), time.process_time()
    rc = cli_main(sys.argv[1:])
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    table = Table(title=f"stages of `convert.py {' '.join(sys.argv[1:])}` (load avg {os.getloadavg()[0]:.1f} at end)")
    for col in ("stage", "calls", "wall s", "CPU s"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name, (sw, sc, n) in TOTALS.items():
        table.add_row(name, str(n), f"{sw:.1f}", f"{sc:.1f}")
    table.add_row("whole run", "1", f"{wall:.1f}", f"{cpu:.1f}")
    Console(width=120).print(table)
    return rc


if __name__ == "__main__":
    sys.exit(main())
