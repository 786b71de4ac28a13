"""test-backend-ops from the patched build: MUL_MAT_ID with masked ids (typed expert groups)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from gemq_gguf import runtime


def _test_backend_ops() -> Path:
    try:
        return runtime.bin_path("test-backend-ops")
    except Exception as e:  # GemqError: build missing
        pytest.skip(f"patched llama.cpp tools are not built (run python cpp_patch/build.py): {e}")


def test_mul_mat_id_masked_cpu() -> None:
    exe = _test_backend_ops()
    res = subprocess.run([str(exe), "-o", "MUL_MAT_ID", "-p", "masked=1", "-b", "CPU"],
                         capture_output=True, text=True, timeout=1200)
    out = re.sub(r"\x1b\[[0-9;]*m", "", res.stdout + res.stderr)  # drop colours
    cases = [ln for ln in out.splitlines() if ln.strip().startswith("MUL_MAT_ID(") and "masked=1" in ln]
    ok = [ln for ln in cases if ln.rstrip().endswith("OK")]
    bad = [ln for ln in cases if not ln.rstrip().endswith("OK")]
    assert res.returncode == 0, out[-4000:]
    assert not bad, "\n".join(bad[:20])
    # one case per type x shape (see cpp_patch/patches/0006); every requested type must be there
    assert len(ok) >= 60, out[-4000:]
    for t in ("q4_K", "q2_K", "iq3_xxs", "q8_0", "f16"):
        assert any(f"type_a={t}," in ln for ln in ok), f"no masked case for {t}"
    m = re.search(r"(\d+)/(\d+) tests passed", out)
    assert m and m.group(1) == m.group(2), out[-2000:]
