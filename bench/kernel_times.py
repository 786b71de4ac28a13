"""Per-kernel GPU times of the MoE decode kernels (Nsight Compute), uniform vs grouped files.

llama-bench's tg128 ratio says how much slower a grouped file decodes; this says where: the mean time of
the fused gate/up(+GLU) kernel and of the down-projection kernel of every file, and their ratio to the
first file's (the uniform one). Kernels are read from `ncu --csv --page raw` with
`gpu__time_duration.sum`; the MoE ones are the mmvq launches whose grid has one row per selected expert.

    python bench/kernel_times.py --ncu ncu --bin-dir BUILD/bin --top-k 8 uniform.gguf grouped.gguf ...
    python bench/kernel_times.py --csv a.csv b.csv            (tables from saved ncu CSVs)
"""
from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
from pathlib import Path

KERNEL = re.compile(r"(mul_mat_vec_q(?:_grouped)?)<([^>]*)>")


def moe_kernel_times(rows: list[list[str]], top_k: int) -> dict[str, list[float]]:
    """Durations (ns) of the MoE mmvq kernels by role ('gate/up' or 'down') from ncu's raw CSV rows."""
    head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    hdr = rows[head]
    name_col, grid_col = hdr.index("Kernel Name"), hdr.index("Grid Size")
    time_col = hdr.index("gpu__time_duration.sum")
    times: dict[str, list[float]] = {"gate/up": [], "down": []}
    for r in rows[head + 2:]:  # the row after the header holds the units
        m = KERNEL.search(r[name_col]) if len(r) > time_col else None
        grid = [int(x) for x in re.findall(r"\d+", r[grid_col])] if m else []
        if not m or len(grid) != 3 or grid[1] != top_k:
            continue
        args = [a.strip() for a in m.group(2).split(",")]
        # grouped<has_gate, rows, class>; stock mul_mat_vec_q<type, ncols, has_fusion, small_k, halve_iters>
        fused = args[0] == "1" if m.group(1).endswith("_grouped") else args[2] == "1"
        times["gate/up" if fused else "down"].append(float(r[time_col].replace(",", "")))
    return times


def profile(ncu: str, bin_dir: Path, model: Path, skip: int, count: int) -> list[list[str]]:
    """ncu over a short llama-bench decode run; warm caches and the GPU's own clocks, as in real decoding."""
    cmd = [ncu, "--clock-control", "none", "--cache-control", "none", "-k", "regex:mul_mat_vec_q",
           "--launch-skip", str(skip), "--launch-count", str(count), "--metrics", "gpu__time_duration.sum",
           "--csv", "--page", "raw", str(bin_dir / "llama-bench"), "-m", str(model), "-p", "0", "-n", "32",
           "-r", "1", "-ngl", "99"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or '"ID"' not in res.stdout:
        raise SystemExit(f"ncu found no kernels in {model.name} (exit {res.returncode}): {res.stderr.strip()[-600:]}")
    return list(csv.reader(res.stdout[res.stdout.find('"ID"'):].splitlines()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path, help="GGUF models (first = baseline), or CSVs with --csv")
    ap.add_argument("--csv", action="store_true", help="the files are saved ncu CSVs")
    ap.add_argument("--ncu", default="ncu")
    ap.add_argument("--bin-dir", type=Path)
    ap.add_argument("--top-k", type=int, default=8, help="experts used per token (the MoE kernels' grid.y)")
    ap.add_argument("--skip", type=int, default=400, help="kernels to skip (load, warm-up)")
    ap.add_argument("--count", type=int, default=300)
    a = ap.parse_args()
    if not a.csv and a.bin_dir is None:
        ap.error("--bin-dir (llama-bench's folder) is needed to profile models")

    print("| file | gate/up us | down us | gate/up ratio | down ratio |\n|---|---|---|---|---|")
    base: dict[str, float] = {}
    for f in a.files:
        rows = (list(csv.reader(f.open())) if a.csv
                else profile(a.ncu, a.bin_dir, f, a.skip, a.count))
        times = moe_kernel_times(rows, a.top_k)
        mean = {k: sum(v) / len(v) / 1000 for k, v in times.items() if v}
        if not mean:
            print(f"| {f.name} | no MoE kernels found (top-k {a.top_k}?) | | | |")
            continue
        base = base or mean
        cells = [f"{mean.get(k, float('nan')):.2f}" for k in ("gate/up", "down")]
        ratios = [f"{mean[k] / base[k]:.2f}" if k in mean and k in base else "-" for k in ("gate/up", "down")]
        print(f"| {f.name} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
