"""The README's main job on the built-in demo model, and a quality sanity check on real weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemq_gguf.cli import main as convert_main
from gemq_gguf.data import eval_texts
from gemq_gguf.evaluate import evaluate_gguf
from gemq_gguf.ggml.lib import is_patched

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("demo")
    runs = {"f32": ["--uniform", "F32", "--non-expert", "F32"],
            "gemq3": ["--budget", "3.0", "--calib-tokens", "4096"],
            "q2k": ["--uniform", "Q2_K"]}
    out = {}
    for name, args in runs.items():
        out[name] = d / f"{name}.gguf"
        assert convert_main(["demo", "-o", str(out[name]), *args]) == 0
    return out


def test_demo_budget_run(files) -> None:
    report = json.loads(files["gemq3"].with_suffix(".json").read_text())
    assert report["allocation"]["bpw"] <= 3.0 and report["file"]["expert_bpw"] <= 3.0
    assert files["gemq3"].with_suffix(".png").exists()


@pytest.mark.skipif(not is_patched(), reason="mixed files need the patched llama-cpp-python (./setup.sh builds it)")
def test_demo_quality_orders_by_bits(files) -> None:
    texts = {k: v[:60_000] for k, v in eval_texts().items()}
    kld = {n: evaluate_gguf(files[n], files["f32"], texts, ctx=512, max_chunks=4).total.kld_mean for n in ("gemq3", "q2k")}
    assert 0 < kld["gemq3"] < kld["q2k"], kld
