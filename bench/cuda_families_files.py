"""The test files of bench/cuda_families.sh, made on the CPU (the GPU machine has no gemq-gguf install).

Per family, the way tests/test_families.py makes them: the tiny seeded checkpoint (tests/tiny_models.py),
its F32 GGUF, a uniform Q4_K file, the same Q4_K bytes split into 3 groups (expert e -> group e % 3),
and a truly mixed `--budget` grouped file (Q2_K/Q4_K/Q6_K experts, everything else F32).

    PYTHONPATH=$PWD python bench/cuda_families_files.py OUT_DIR [FAMILY ...]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_runtime_e2e import rewrite_experts  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402

from gemq_gguf.cli import main as convert_main  # noqa: E402
from gemq_gguf.convert.hf_to_gguf import hf_to_float_gguf  # noqa: E402

DEFAULT = ("deepseek_v3", "gpt_oss", "glm4_moe")


def make_files(family: str, out: Path, work: Path) -> list[Path]:
    """The four files of one family under out: -f32, -uniform, -split (3 x Q4_K groups), -mixed."""
    model = make_tiny_model(family, work / family)
    f32 = hf_to_float_gguf(model, out / f"{family}-f32.gguf", "f32")
    uniform = rewrite_experts(f32, out / f"{family}-uniform.gguf", ["Q4_K"])
    split = rewrite_experts(f32, out / f"{family}-split.gguf", ["Q4_K"] * 3)
    mixed = out / f"{family}-mixed.gguf"
    assert convert_main([str(model), "-o", str(mixed), "--budget", "4.0", "--types", "Q2_K,Q4_K,Q6_K",
                         "--non-expert", "F32", "--calib-tokens", "1024", "--seq-len", "64", "--no-verify"]) == 0
    return [f32, uniform, split, mixed]


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for family in sys.argv[2:] or DEFAULT:
            for f in make_files(family, out, Path(work)):
                print(f"{f.name}: {f.stat().st_size / 2**20:.1f} MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
