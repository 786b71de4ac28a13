"""The verification step, tied embeddings, and what the report records to reproduce a run.

Tests that score a converted file several times (~10 s each on 2 busy cores) are marked slow."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from reference import hf_logits, load_hf, sample_tokens
from tiny_models import make_tiny_model

from gemq_gguf import pipeline
from gemq_gguf.cli import main as convert_main
from gemq_gguf.errors import GemqError
from gemq_gguf.evaluate import RunOptions, llama_logits
from gemq_gguf.evaluate.cli import main as evaluate_main
from gemq_gguf.gemq.calib import load_sources
from gemq_gguf.options import VerifyOptions
from gemq_gguf.verify import verification_text, verify_file


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    return make_tiny_model("mixtral", tmp_path_factory.mktemp("mixtral") / "hf")


@pytest.fixture(scope="module")
def converted(mixtral, tmp_path_factory) -> tuple[Path, Path, dict]:
    """A verified Q4_K file, its float GGUF (kept) and its report."""
    out = tmp_path_factory.mktemp("q4k") / "q4k.gguf"
    assert convert_main([str(mixtral), "-o", str(out), "--uniform", "Q4_K", "--keep-intermediate"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    return out, Path(report["intermediate"]), report


def _copy_with(src: Path, dst: Path, tensor: str, change) -> Path:
    """A copy of an F32-output GGUF with one F32 tensor's values changed in place."""
    dst.write_bytes(src.read_bytes())
    reader = GGUFReader(dst, "r+")
    t = next(t for t in reader.tensors if t.name == tensor)
    t.data[...] = change(np.array(t.data))
    reader.data.flush()
    return dst


@pytest.mark.slow
def test_report_has_the_verification(converted) -> None:
    _, _, report = converted
    v = report["verification"]
    assert v["finite"] and v["n_tokens"] == VerifyOptions.chunks * (VerifyOptions.ctx - 1 - VerifyOptions.ctx // 2)
    assert 0 < v["kld_mean"] < 0.05 and v["same_top_p"] > 0.8


@pytest.mark.slow
def test_verification_equals_evaluate_on_the_same_text(converted, tmp_path) -> None:
    """What the conversion reports is what `python -m gemq_gguf.evaluate` prints on the same text."""
    out, ref, report = converted
    text = tmp_path / "calibration.txt"
    text.write_text(verification_text([(s.text, s.weight) for s in load_sources()], VerifyOptions()), encoding="utf-8")
    js = tmp_path / "eval.json"
    assert evaluate_main([str(out), "--ref", str(ref), "--text", str(text), "--ctx", str(VerifyOptions.ctx),
                          "--chunks", str(VerifyOptions.chunks), "--json", str(js)]) == 0
    total = json.loads(js.read_text())["total"]
    assert total["n_tokens"] == report["verification"]["n_tokens"]
    assert total["kld_mean"] == pytest.approx(report["verification"]["kld_mean"], rel=1e-6)
    assert total["same_top_p"] == report["verification"]["same_top_p"]


@pytest.mark.slow
def test_non_finite_logits_fail(converted, tmp_path) -> None:
    _, ref, _ = converted
    broken = _copy_with(ref, tmp_path / "nan.gguf", "output_norm.weight", lambda w: np.full_like(w, np.nan))
    with pytest.raises(GemqError, match="non-finite"):
        verify_file(broken, ref, verification_text([(s.text, s.weight) for s in load_sources()], VerifyOptions()),
                    VerifyOptions(), tmp_path / "cache")


@pytest.mark.slow
def test_a_file_far_from_the_model_fails(converted, tmp_path) -> None:
    """A wrong output matrix (rows shuffled: each token gets another token's logit) is refused."""
    _, ref, _ = converted
    broken = _copy_with(ref, tmp_path / "far.gguf", "output.weight",
                        lambda w: 20 * np.random.default_rng(0).permutation(w, axis=0))
    with pytest.raises(GemqError, match="far from the unquantized model"):
        verify_file(broken, ref, verification_text([(s.text, s.weight) for s in load_sources()], VerifyOptions()),
                    VerifyOptions(), tmp_path / "cache")


def test_failed_verification_leaves_nothing(mixtral, tmp_path, monkeypatch) -> None:
    """A written file that llama.cpp refuses: error, exit 2, no output, no report."""
    def write_then_break(float_gguf, out, *args, **kwargs):
        summary = real_write(float_gguf, out, *args, **kwargs)
        out.write_bytes(out.read_bytes()[: out.stat().st_size // 2])  # truncated
        return summary

    real_write = pipeline.write_gguf
    monkeypatch.setattr(pipeline, "write_gguf", write_then_break)
    out = tmp_path / "bad.gguf"
    assert convert_main([str(mixtral), "-o", str(out), "--uniform", "Q4_K"]) == 2
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_no_verify(mixtral, tmp_path) -> None:
    out = tmp_path / "nv.gguf"
    assert convert_main([str(mixtral), "-o", str(out), "--uniform", "Q4_K", "--no-verify"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["verification"] is None


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe"])
def test_tied_embeddings_load_and_match_hf(arch, tmp_path) -> None:
    """Families whose llama.cpp loader requires output.weight: a tied checkpoint gets its embedding as
    the output matrix, loads, and computes what the Hugging Face model computes."""
    model = make_tiny_model(arch, tmp_path / "hf", tie_word_embeddings=True)
    out = tmp_path / "tied.gguf"
    assert convert_main([str(model), "-o", str(out), "--uniform", "F32", "--non-expert", "F32", "--no-verify"]) == 0
    names = {t.name: t for t in GGUFReader(out).tensors}
    np.testing.assert_array_equal(names["output.weight"].data, names["token_embd.weight"].data)
    tokens = sample_tokens(model)
    ours = llama_logits(out, tokens, RunOptions(f32_kv=True))
    ref = hf_logits(load_hf(model), tokens)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-3


@pytest.mark.slow
def test_report_records_how_to_reproduce(converted, mixtral) -> None:
    _, _, report = converted
    r = report["reproduce"]
    assert r["request"]["experts"] == {"type": "Q4_K"} and r["request"]["calib"]["seed"] == 0
    assert r["request"]["verify"] == {"chunks": VerifyOptions.chunks, "ctx": VerifyOptions.ctx,
                                      "max_kld": VerifyOptions.max_kld}
    assert r["code"].startswith(("git ", "gemq-gguf "))
    assert r["llama_cpp"]["version"] and r["llama_cpp"]["stamp"]
    import hashlib
    assert r["checkpoint"]["files"]["config.json"] == hashlib.sha256((mixtral / "config.json").read_bytes()).hexdigest()
    assert [s["name"] for s in r["checkpoint"]["shards"]] == ["model.safetensors"]
    assert [c["name"] for c in r["calibration_texts"]] == [s.name for s in load_sources()]


def test_verification_text_follows_the_weights() -> None:
    opts = VerifyOptions(chunks=4, ctx=8)
    text = verification_text([("a" * 1000, 1.0), ("b" * 1000, 3.0), ("c" * 1000, 0.01)], opts)
    assert text.count("a") and text.count("b") == 3 * text.count("a") and "c" not in text
