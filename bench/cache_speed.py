"""Wall and CPU time of a demo conversion: before (another checkout, e.g. main), after with a cold cache,
a second `--budget` on the cached model, and `llama-quantize` Q3_K_M of the same model's float GGUF.

Each step runs in its own process under /usr/bin/time -v (wall, user+sys CPU, peak RSS) with its log in
OUT_DIR/STEP.log; the table is read back from every step's log in OUT_DIR, so steps can run in separate
invocations (`--steps before` next to `--steps cold,cached,quantize`). On a shared machine compare CPU
time: other processes stretch wall time, not CPU time (the load average at each start is shown).

    python bench/cache_speed.py [--before-repo /work/main] [--calib-tokens 4096] [--out-dir /tmp/cache-speed]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
STEPS = ("before", "cold", "cached", "quantize")


def run_timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
    """Run `cmd` under /usr/bin/time -v, everything into `log` (first line: the load average at start)."""
    with log.open("w") as f:
        f.write(f"load average at start: {os.getloadavg()[0]:.1f}\n{' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"{' '.join(cmd)} failed (rc {rc}); see {log}")


def read_timing(log: Path) -> dict[str, float] | None:
    """Wall, CPU (user + sys) seconds, peak RSS and start load of a finished step's log, else None."""
    text = log.read_text(errors="replace") if log.exists() else ""

    def field(name: str) -> str | None:
        m = re.search(rf"{re.escape(name)}: (.+)", text)
        return m.group(1).strip() if m else None
    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    if wall is None:
        return None
    parts = [float(p) for p in wall.split(":")]
    load = field("load average at start")
    return {"wall_s": sum(p * 60 ** i for i, p in enumerate(reversed(parts))),
            "cpu_s": float(field("User time (seconds)")) + float(field("System time (seconds)")),
            "max_rss_mib": int(field("Maximum resident set size (kbytes)")) / 1024,
            "load_at_start": float(load) if load else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before-repo", type=Path, default=Path("/work/main"), help="the checkout timed as 'before'")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--budget", default="3.0")
    ap.add_argument("--second-budget", default="2.5")
    ap.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()) / "cache-speed")
    args = ap.parse_args()
    out, steps = args.out_dir, args.steps.split(",")
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "stats-cache"
    names = {"before": f"before ({args.before_repo}), --budget {args.budget}",
             "cold": f"this branch, cold cache, --budget {args.budget}",
             "cached": f"this branch, cached, --budget {args.second_budget}",
             "quantize": "llama-quantize Q3_K_M (from the float GGUF)"}

    def convert(repo: Path, step: str, *extra: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(repo)}
        cmd = [sys.executable, str(repo / "convert.py"), "demo", "--calib-tokens", str(args.calib_tokens),
               "-o", str(out / f"{step}.gguf"), *extra]
        run_timed(cmd, repo, env, out / f"{step}.log")

    if "before" in steps:
        convert(args.before_repo, "before", "--budget", args.budget)
    if "cold" in steps:
        convert(REPO, "cold", "--budget", args.budget, "--cache-dir", str(cache), "--keep-intermediate")
    if "cached" in steps:
        convert(REPO, "cached", "--budget", args.second_budget, "--cache-dir", str(cache))
    if "quantize" in steps:
        sys.path.insert(0, str(REPO))
        from gemq_gguf.runtime import bin_path
        src = sorted(out.glob("cold.*.gguf"))[0]  # the float GGUF the cold run kept
        run_timed([str(bin_path("llama-quantize")), str(src), str(out / "quantize.gguf"), "Q3_K_M", str(os.cpu_count())],
                  out, dict(os.environ), out / "quantize.log")

    rows = {s: t for s in STEPS if (t := read_timing(out / f"{s}.log")) is not None}
    table = Table(title=f"demo conversion, {args.calib_tokens} calibration tokens, {os.cpu_count()} CPUs")
    for col in ("run", "wall s", "CPU s (user+sys)", "peak RSS MiB", "load avg at start"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for s, r in rows.items():
        table.add_row(names[s], f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['max_rss_mib']:.0f}", f"{r['load_at_start']:.1f}")
    if "cached" in rows and "quantize" in rows:
        c, q = rows["cached"], rows["quantize"]
        table.caption = f"cached run / llama-quantize: wall {c['wall_s'] / q['wall_s']:.2f}x, CPU {c['cpu_s'] / q['cpu_s']:.2f}x"
    Console().print(table)
    (out / "cache_speed.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
