"""Ctrl-C or SIGTERM at any stage: exit != 0, no output and no temporary file left, and how to resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]

# the CLI with ggml's quantizer slowed down, so the writing stage lasts long enough to be interrupted;
# Ctrl-C's handler installed explicitly, since a test run started in the background inherits SIGINT ignored
DRIVER = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import gemq_gguf.convert.writer as writer
from gemq_gguf.cli import main
quantize = writer.quantize
writer.quantize = lambda *a, **k: (time.sleep(0.3), quantize(*a, **k))[1]
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model("mixtral", tmp_path_factory.mktemp("m") / "hf")


def _wait_for(pattern: str, where: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(where.glob(pattern)):
            return
        if proc.poll() is not None:
            pytest.fail(f"finished before {pattern} appeared: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"{pattern} never appeared")


@pytest.mark.slow
@pytest.mark.parametrize("sig,when,experts", [
    (signal.SIGINT, ".gemq-*/*.gguf", ["--uniform", "Q4_K"]),   # stage 1's float GGUF exists
    (signal.SIGTERM, "out.gguf.tmp", ["--uniform", "Q4_K"]),    # while the output is written
    (signal.SIGINT, "out.png", ["--budget", "3.0", "--types", "Q2_K,Q4_K", "--calib-tokens", "128", "--seq-len", "64"]),  # allocated
], ids=["sigint-after-stage-1", "sigterm-while-writing", "sigint-after-the-allocation"])
def test_interrupted_conversion_leaves_nothing(tmp_path, model, sig, when, experts) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(model), *experts, "-o", str(out_dir / "out.gguf")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(when, out_dir, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "rerun the same command" in err and "Traceback" not in err, err
    assert list(out_dir.iterdir()) == []  # no GGUF, no temporary file or folder, no report or heatmap
