"""Evaluation numbers must be llama-perplexity's numbers: statistics on synthetic logits, then end to end."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from gemq_gguf import evaluate as ev
from gemq_gguf.data import eval_texts
from gemq_gguf.errors import GemqError
from gemq_gguf.evaluate.base_file import write_chunk, write_header


def _softmax_log(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    return x - (x.max(1, keepdims=True) + np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)))


def _scores(test: np.ndarray, ref: np.ndarray, targets: np.ndarray | None = None) -> ev.TokenScores:
    targets = np.zeros(len(test), int) if targets is None else targets
    return ev.score_chunk(test.astype(np.float32), ev.encode_log_probs(ref.astype(np.float32)), targets)


# ------------------------------------------------------------------------------------ statistics

def test_identical_distributions_have_zero_kld() -> None:
    logits = np.random.default_rng(0).normal(0, 4, (50, 1000)).astype(np.float32)
    s = _scores(logits, logits, logits.argmax(1))  # targets inside the 16-nat window
    assert np.abs(s.kld).max() < 1e-4  # only the 16-bit encoding's rounding remains: llama's noise floor
    assert abs(s.kld.mean()) < 1e-5
    assert s.same_top.all()
    np.testing.assert_allclose(s.nll, s.nll_base, atol=3e-4)  # one encoding step is 16/65535 nats


def test_kld_known_value() -> None:
    ref = np.log(np.array([[0.5, 0.5]]))
    test = np.log(np.array([[0.9, 0.1]]))
    s = _scores(test, ref)
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert s.kld[0] == pytest.approx(expected, abs=1e-4)
    assert s.nll[0] == pytest.approx(-math.log(0.9), rel=1e-6)
    assert s.nll_base[0] == pytest.approx(math.log(2), abs=1e-4)
    assert s.p_diff[0] == pytest.approx(0.4, abs=1e-4)


def test_kld_matches_exact_kl_for_peaked_distributions() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(0, 3, (64, 500))
    test = ref + rng.normal(0, 0.3, ref.shape)
    lp, lq = _softmax_log(ref), _softmax_log(test)
    exact = (np.exp(lp) * (lp - lq)).sum(1)
    np.testing.assert_allclose(_scores(test, ref).kld, exact, rtol=2e-3, atol=5e-5)


def test_encoding_clamps_to_a_16_nat_window() -> None:
    base = ev.encode_log_probs(np.array([[0.0, -20.0, -1.0, -16.0]], np.float32))
    lse = math.log(1 + math.exp(-20) + math.exp(-1) + math.exp(-16))
    assert base.q[0, 1] == 0 and base.q[0, 3] == 0  # at or below max - 16: the floor value
    assert base.q[0, 0] == 65535
    assert base.min_log_prob[0] == pytest.approx(-16 - lse, abs=1e-5)
    assert base.log_probs(slice(0, 1))[0, 2] == pytest.approx(-1 - lse, abs=3e-4)


def test_floor_excludes_tiny_base_probabilities() -> None:
    """Tokens at the floor (p_base <= e^-16) add nothing, even where the model puts mass on them."""
    ref = np.array([[0.0, -30.0]])
    test = np.array([[0.0, 0.0]])
    s = _scores(test, ref)
    assert s.kld[0] == pytest.approx(math.log(2), abs=1e-6)  # only p=1 on token 0: log(1/0.5)


def test_top1_ties_take_the_first_index() -> None:
    s = _scores(np.array([[1.0, 1.0, 0.0]]), np.array([[0.0, 1.0, 1.0]]))
    assert not s.same_top[0]  # model's first max is 0, base's is 1


def test_percentile_and_median_follow_llama() -> None:
    v = np.arange(11, dtype=np.float32)
    assert ev.percentile(v, 0.99) == pytest.approx(9.9, rel=1e-6)
    assert ev.percentile(v, 0.999) == pytest.approx(9.99, rel=1e-6)
    assert ev.percentile(v, 0.0) == 0 and ev.percentile(v, 1.0) == 10
    assert ev.median(np.array([1, 2, 3, 10], np.float32)) == 2.5
    assert ev.median(np.array([1, 2, 3], np.float32)) == 2
    x = np.sort(np.random.default_rng(2).exponential(size=1001).astype(np.float32))
    for f in (0.9, 0.99, 0.999):
        assert ev.percentile(x, f) == pytest.approx(np.percentile(x.astype(np.float64), 100 * f), rel=1e-5)


def test_stats_from_scores() -> None:
    n = 200
    nll = np.full(n, math.log(4), np.float32)
    s = ev.TokenScores(nll=nll, nll_base=np.full(n, math.log(2), np.float32), kld=np.linspace(0, 1, n),
                       p_diff=np.full(n, -0.25, np.float32), same_top=np.arange(n) % 4 != 0, n_chunks=2)
    st = ev.stats_from_scores(s)
    assert st.ppl == pytest.approx(4, rel=1e-6) and st.ppl_base == pytest.approx(2, rel=1e-6)
    assert st.ppl_ratio == pytest.approx(2, rel=1e-6) and st.ppl_unc == 0
    assert st.kld_mean == pytest.approx(0.5) and st.kld_max == pytest.approx(1)
    assert st.kld_median == pytest.approx(0.5, abs=1e-6)
    assert st.same_top_p == 0.75 and st.rms_dp == pytest.approx(0.25)
    assert st.same_top_p_unc == pytest.approx(math.sqrt(0.75 * 0.25 / (n - 1)))
    assert st.to_dict()["n_chunks"] == 2


def test_total_is_token_weighted() -> None:
    a = ev.TokenScores(np.zeros(100, np.float32), np.zeros(100, np.float32), np.zeros(100),
                       np.zeros(100, np.float32), np.ones(100, bool), 1)
    b = ev.TokenScores(np.ones(300, np.float32), np.zeros(300, np.float32), np.ones(300),
                       np.zeros(300, np.float32), np.zeros(300, bool), 3)
    total = ev.stats_from_scores(ev.TokenScores.concat([a, b]))
    assert total.kld_mean == pytest.approx(0.75) and total.same_top_p == 0.25
    assert total.ppl == pytest.approx(math.exp(0.75)) and total.n_chunks == 4


def test_kld_vs_logits() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    ref = rng.normal(0, 2, (20, 300))
    same = ev.kld_vs_logits(torch.tensor(ref)[None], ref)
    assert same.kld_max == pytest.approx(0, abs=1e-12) and same.same_top_p == 1
    c = ev.kld_vs_logits(np.log([[0.9, 0.1]]), np.log([[0.5, 0.5]]))
    assert c.kld_mean == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(5))
    with pytest.raises(GemqError):
        ev.kld_vs_logits(ref[:, :10], ref)


# ------------------------------------------------------------------------------------ base files

def _write_base(path: Path, n_ctx: int, n_vocab: int, n_chunk: int, seed: int) -> list[ev.BaseChunk]:
    rng = np.random.default_rng(seed)
    chunks = []
    with open(path, "wb") as f:
        write_header(f, n_ctx, n_vocab, rng.integers(0, n_vocab, n_chunk * n_ctx))
        for _ in range(n_chunk):
            chunks.append(ev.encode_log_probs(rng.normal(0, 5, (n_ctx - 1 - n_ctx // 2, n_vocab))))
            write_chunk(f, chunks[-1])
    return chunks


@pytest.mark.parametrize("n_vocab", [17, 18])  # odd vocabularies get one padding slot per row
def test_base_file_roundtrip(tmp_path: Path, n_vocab: int) -> None:
    path = tmp_path / "b.kld"
    chunks = _write_base(path, 8, n_vocab, 3, 0)
    nv = 2 * ((n_vocab + 1) // 2) + 4
    assert path.stat().st_size == 20 + 4 * 3 * 8 + 3 * 3 * nv * 2
    base = ev.BaseFile.open(path)
    assert (base.n_ctx, base.n_vocab, base.n_chunk, base.n_score) == (8, n_vocab, 3, 3)
    for i, c in enumerate(chunks):
        got = base.chunk(i)
        np.testing.assert_array_equal(got.q, c.q)
        np.testing.assert_array_equal(got.scale, c.scale)
        np.testing.assert_array_equal(got.min_log_prob, c.min_log_prob)


def test_merge_base_files(tmp_path: Path) -> None:
    a = _write_base(tmp_path / "a.kld", 8, 17, 2, 0)
    b = _write_base(tmp_path / "b.kld", 8, 17, 3, 1)
    merged = ev.BaseFile.open(ev.merge_base_files([tmp_path / "a.kld", tmp_path / "b.kld"], tmp_path / "m.kld"))
    assert merged.n_chunk == 5
    np.testing.assert_array_equal(merged.tokens[16:], ev.BaseFile.open(tmp_path / "b.kld").tokens)
    for i, c in enumerate(a + b):
        np.testing.assert_array_equal(merged.chunk(i).q, c.q)


def test_not_a_base_file(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"nonsense" * 4)
    with pytest.raises(GemqError):
        ev.BaseFile.open(tmp_path / "x")


SAMPLE_OUTPUT = """
====== Perplexity statistics ======
Mean PPL(Q)                   :  12.345678 ±   0.123456
Mean PPL(base)                :  12.000000 ±   0.120000
Cor(ln(PPL(Q)), ln(PPL(base))):  99.12%
Mean ln(PPL(Q)/PPL(base))     :   0.028385 ±   0.001000
Mean PPL(Q)/PPL(base)         :   1.028806 ±   0.001029
Mean PPL(Q)-PPL(base)         :   0.345678 ±   0.012345

====== KL divergence statistics ======
Mean    KLD:   0.012345 ±   0.000123
Maximum KLD:   1.234567
99.9%   KLD:   0.812345
99.0%   KLD:   0.212345
95.0%   KLD:   0.052345
90.0%   KLD:   0.032345
Median  KLD:   0.005432
10.0%   KLD:   0.000123
Minimum KLD:   0.000001

====== Token probability statistics ======
RMS Δp    :  3.210 ± 0.045 %
Same top p: 95.123 ± 0.321 %
"""


def test_parse_kld_output() -> None:
    st = ev.parse_kld_output(SAMPLE_OUTPUT, n_tokens=1020, n_chunks=4)
    assert st.ppl == 12.345678 and st.ppl_unc == 0.123456 and st.ppl_base == 12.0
    assert st.ppl_ratio == 1.028806 and st.kld_mean == 0.012345 and st.kld_p999 == 0.812345
    assert st.kld_p99 == 0.212345 and st.kld_median == 0.005432 and st.kld_max == 1.234567
    assert st.same_top_p == pytest.approx(0.95123) and st.rms_dp == pytest.approx(0.0321)
    with pytest.raises(GemqError):
        ev.parse_kld_output("no stats", 1, 1)


# ------------------------------------------------------------------------- end to end vs llama.cpp

def _peaked_tiny_mixtral(out: Path) -> Path:
    """The project's tiny Mixtral with a scaled-up lm_head: peaked distributions whose logit range
    exceeds llama-perplexity's 16-nat window, so the top-1 and floor logic are both exercised."""
    from safetensors.torch import load_file, save_file
    from tiny_models import make_tiny_model

    make_tiny_model("mixtral", out)
    weights = load_file(out / "model.safetensors")
    weights["lm_head.weight"] *= 12
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _requantize(src: Path, dst: Path, qtype_name: str) -> None:
    """Copy a F32 GGUF with every 2-D+ weight quantized by gguf-py (a stand-in for a real quant)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    for t in reader.tensors:
        data = np.array(t.data)
        if data.ndim >= 2 and data.shape[-1] % 32 == 0:
            writer.add_tensor(t.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("llama_cpp")
    from gemq_gguf.convert.hf_to_gguf import hf_to_float_gguf

    tmp = tmp_path_factory.mktemp("evalmodels")
    files = {"hf": _peaked_tiny_mixtral(tmp / "hf")}
    files["ref"] = hf_to_float_gguf(files["hf"], tmp / "ref-f32.gguf")
    for q in ("Q8_0", "Q4_0"):
        files[q] = tmp / f"test-{q}.gguf"
        _requantize(files["ref"], files[q], q)
    return files


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    return {d: t[:12_000] for d, t in eval_texts().items() if d in ("prose", "code")}


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_python_backend_equals_llama_perplexity(gguf_files: dict[str, Path], texts: dict[str, str],
                                                qtype: str) -> None:
    binary = ev.find_llama_perplexity()
    py = ev.evaluate_gguf(gguf_files[qtype], gguf_files["ref"], texts, max_chunks=4)
    cpp = ev.evaluate_gguf(gguf_files[qtype], gguf_files["ref"], texts, max_chunks=4,
                           backend="llama-perplexity", binary=binary)
    for name in [*texts, "total"]:
        a = py.total if name == "total" else py.domains[name]
        b = cpp.total if name == "total" else cpp.domains[name]
        assert a.n_tokens == b.n_tokens
        for key in ("ppl", "ppl_base", "ppl_ratio", "kld_mean"):
            # llama-perplexity prints 6 decimals: allow that rounding on top of the relative bound
            assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-3, abs=1e-6), (name, key)
        for key in ("kld_median", "kld_p99", "kld_p999", "kld_max"):
            assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-2, abs=2e-6), (name, key)
        assert round(100 * a.same_top_p, 3) == pytest.approx(100 * b.same_top_p, abs=1e-9), name


@pytest.mark.slow
def test_base_files_are_interchangeable(gguf_files: dict[str, Path], texts: dict[str, str], tmp_path: Path) -> None:
    """Our base file and the binary's hold the same tokens and (to one encoding step) the same log-probs."""
    binary = ev.find_llama_perplexity()
    opts = ev.RunOptions()
    cpp = ev.binary_kld_base(binary, gguf_files["ref"], texts["prose"], tmp_path / "cpp.kld", 512, 3, opts)
    ref = ev.open_llama(gguf_files["ref"], 512, opts)
    py = ev.write_kld_base(ref, texts["prose"], tmp_path / "py.kld", 512, 3)
    ref.close()
    assert (py.n_ctx, py.n_vocab, py.n_chunk) == (cpp.n_ctx, cpp.n_vocab, cpp.n_chunk)
    np.testing.assert_array_equal(py.tokens, cpp.tokens)
    for i in range(py.n_chunk):
        assert np.abs(py.chunk(i).q.astype(int) - cpp.chunk(i).q.astype(int)).max() <= 2
    llm = ev.open_llama(gguf_files["Q4_0"], 512, opts)
    from_cpp, from_py = ev.score_against_base(llm, cpp), ev.score_against_base(llm, py)
    llm.close()
    assert ev.stats_from_scores(from_cpp).kld_mean == pytest.approx(ev.stats_from_scores(from_py).kld_mean, rel=1e-4)


@pytest.mark.slow
def test_cached_reference_equals_paired_run(gguf_files: dict[str, Path], texts: dict[str, str],
                                            tmp_path: Path) -> None:
    paired = ev.evaluate_gguf(gguf_files["Q4_0"], gguf_files["ref"], texts, max_chunks=2)
    for _ in range(2):  # the second run reads the cache
        cached = ev.evaluate_gguf(gguf_files["Q4_0"], gguf_files["ref"], texts, max_chunks=2,
                                  ref_cache_dir=tmp_path)
        assert cached.total == paired.total
    assert len(list(tmp_path.glob("*.kld"))) == 2


@pytest.mark.slow
def test_cli_writes_json(gguf_files: dict[str, Path], texts: dict[str, str], tmp_path: Path) -> None:
    files = []
    for name, text in texts.items():
        files.append(tmp_path / f"{name}.txt")
        files[-1].write_text(text)
    out = tmp_path / "r.json"
    buf = io.StringIO()
    rc = ev.main([str(gguf_files["Q8_0"]), "--ref", str(gguf_files["ref"]), "--text", *map(str, files),
                  "--chunks", "2", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data["domains"]) == {"prose", "code"} and data["total"]["n_tokens"] == 4 * 255
    ev.print_result(ev.evaluate_gguf(gguf_files["Q8_0"], gguf_files["ref"], texts, max_chunks=2), file=buf)
    assert "total" in buf.getvalue()


@pytest.mark.slow
def test_llama_logits_match_hf(gguf_files: dict[str, Path], texts: dict[str, str]) -> None:
    """The helper the converter's exactness tests use: F32 GGUF + F32 KV cache vs torch, same tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    llm = ev.open_llama(gguf_files["ref"], 512, ev.RunOptions())
    tokens = ev.tokenize_like_perplexity(llm, texts["prose"])[:96].tolist()
    llm.close()
    ours = ev.llama_logits(gguf_files["ref"], tokens)
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(gguf_files["hf"], dtype=torch.float32)(torch.tensor([tokens])).logits
    c = ev.kld_vs_logits(ours, hf)
    assert c.n_tokens == 96 and c.same_top_p == 1.0
    assert c.kld_max < 1e-6 and c.max_abs_logprob_diff < 1e-2


def test_too_little_text_is_a_clear_error() -> None:
    with pytest.raises(GemqError, match="at least 1024"):
        ev.n_chunks_for(1000, 512, None)
