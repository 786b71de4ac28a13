"""The same inputs and seed give a byte-identical GGUF, whatever the run and torch's thread count."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model

from gemq_gguf.cli import main as convert_main


def _convert(model: Path, out: Path, threads: int, *args: str) -> tuple[str, dict]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert convert_main([str(model), "-o", str(out), *args, "--no-verify"]) == 0
    finally:
        torch.set_num_threads(before)
    return hashlib.sha256(out.read_bytes()).hexdigest(), json.loads(out.with_suffix(".json").read_text())


@pytest.mark.slow
def test_budget_conversion_is_byte_identical(tmp_path) -> None:
    """--budget (calibration, Fisher draws, costs, allocation, router tuning, quantization with our imatrix):
    two runs with 1 and 2 torch threads, plus a run in another output folder, write the same bytes."""
    model = make_tiny_model("qwen2_moe", tmp_path / "hf")
    args = ("--budget", "3.0", "--calib-tokens", "512", "--seq-len", "128", "--finetune-routers", "--ft-epochs", "1")
    runs = [_convert(model, tmp_path / d / "m.gguf", threads, *args)
            for d, threads in (("a", 1), ("b", 2), ("c", 1)) if (tmp_path / d).mkdir() is None]
    assert runs[0][0] == runs[1][0] == runs[2][0]
    units = [r["units"] for _, r in runs]
    assert units[0] == units[1] == units[2]
