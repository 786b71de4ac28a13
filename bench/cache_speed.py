"""Wall and CPU time of a demo conversion: before (another checkout, e.g. main), after with a cold cache,
a second `--budget` on the cached model, and `llama-quantize` Q3_K_M of the same model's float GGUF.

Each step runs in its own process under /usr/bin/time -v (wall, user+sys CPU, peak RSS); the table
goes to stdout and the raw numbers to OUT_DIR/cache_speed.json. On a shared machine note the load
average that is printed with each row: other processes stretch wall time, not CPU time.

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


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict[str, float]:
    """Run `cmd` under /usr/bin/time -v; its wall, CPU (user + sys) seconds and peak RSS."""
    load = os.getloadavg()[0]
    with log.open("w") as f:
        rc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    text = log.read_text()
    if rc != 0:
        sys.exit(f"{' '.join(cmd)} failed (rc {rc}); see {log}")

    def field(name: str) -> str:
        return re.search(rf"{re.escape(name)}: (.+)", text).group(1).strip()
    parts = [float(p) for p in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")]
    wall = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    cpu = float(field("User time (seconds)")) + float(field("System time (seconds)"))
    return {"wall_s": wall, "cpu_s": cpu, "max_rss_mib": int(field("Maximum resident set size (kbytes)")) / 1024,
            "load_before": load}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before-repo", type=Path, help="a checkout to time the same first command in (e.g. /work/main)")
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--budget", default="3.0")
    ap.add_argument("--second-budget", default="2.5")
    ap.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()) / "cache-speed")
    args = ap.parse_args()
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "stats-cache"
    common = ["demo", "--calib-tokens", str(args.calib_tokens)]
    rows: list[tuple[str, dict[str, float]]] = []

    def convert(repo: Path, slug: str, name: str, *extra: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(repo)}
        cmd = [sys.executable, str(repo / "convert.py"), *common, "-o", str(out / f"{slug}.gguf"), *extra]
        rows.append((name, timed(cmd, repo, env, out / f"{slug}.log")))
        print(name, rows[-1][1], flush=True)

    if args.before_repo:
        convert(args.before_repo, "before", f"before ({args.before_repo}), --budget {args.budget}", "--budget",
                args.budget)
    convert(REPO, "cold", f"this branch, cold cache, --budget {args.budget}", "--budget", args.budget,
            "--cache-dir", str(cache), "--keep-intermediate")
    convert(REPO, "cached", f"this branch, cached, --budget {args.second_budget}", "--budget", args.second_budget,
            "--cache-dir", str(cache))
    sys.path.insert(0, str(REPO))
    from gemq_gguf.runtime import bin_path
    floats = sorted(out.glob("cold.*.gguf"))
    cmd = [str(bin_path("llama-quantize")), str(floats[0]), str(out / "llama-quantize-Q3_K_M.gguf"), "Q3_K_M",
           str(os.cpu_count() or 1)]
    rows.append(("llama-quantize Q3_K_M (float GGUF in)", timed(cmd, out, dict(os.environ), out / "llama-quantize.log")))

    table = Table(title=f"demo conversion, {args.calib_tokens} calibration tokens, {os.cpu_count()} CPUs")
    for col in ("run", "wall s", "CPU s (user+sys)", "peak RSS MiB", "load avg at start"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, r in rows:
        table.add_row(name, f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['max_rss_mib']:.0f}",
                      f"{r['load_before']:.1f}")
    Console().print(table)
    (out / "cache_speed.json").write_text(json.dumps(dict(rows), indent=1))


if __name__ == "__main__":
    main()
