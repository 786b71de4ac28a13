"""End to end through convert.py and llama-cpp-python, for every supported architecture."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from reference import hf_logits, load_hf, sample_tokens
from tiny_models import ARCHS, make_tiny_model

from gemq_gguf.cli import main as convert_main
from gemq_gguf.evaluate import RunOptions, kld_vs_logits, llama_logits
from gemq_gguf.plan import plan_from_units

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, make_tiny_model(request.param, tmp_path_factory.mktemp(request.param) / "hf")


def _convert(model: Path, out: Path, *args: str) -> Path:
    assert convert_main([str(model), "-o", str(out), *args]) == 0
    assert out.exists() and out.with_suffix(".json").exists()
    return out


def test_f32_gguf_matches_hf(tiny, tmp_path) -> None:
    arch, model = tiny
    gguf = _convert(model, tmp_path / "f32.gguf", "--uniform", "F32", "--non-expert", "F32")
    tokens = sample_tokens(model)
    ours = llama_logits(gguf, tokens, RunOptions(f32_kv=True))
    ref = hf_logits(load_hf(model), tokens)
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel <= 1e-3, f"{arch}: relative logit error {rel:.2e}"


def test_tokenizer_agrees_with_hf(tiny, tmp_path) -> None:
    from llama_cpp import Llama
    from transformers import AutoTokenizer
    arch, model = tiny
    gguf = _convert(model, tmp_path / "tok.gguf", "--uniform", "Q8_0", "--non-expert", "Q8_0")
    text = "def f(x):\n    return x ** 2  # squares, 12345 and café!"
    llm = Llama(str(gguf), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == AutoTokenizer.from_pretrained(model)(text)["input_ids"]


def _mixed_units(layers: list[int], n_experts: int, per: str) -> list[dict]:
    """per="tensor": one type per layer-projection (stock layout); per="expert": one type per expert,
    interleaved (expert e of layer l: Q2_K/Q4_K/Q6_K by (e + l) % 3), so the writer groups and renumbers."""
    if per == "tensor":
        cycle = ["Q2_K", "Q4_K", "Q6_K", "Q3_K", "IQ4_XS"]
        return [{"layer": l, "expert": None, "proj": p, "type": cycle[(i + j) % len(cycle)]}
                for i, l in enumerate(layers) for j, p in enumerate(("gate", "up", "down"))]
    cycle = ["Q2_K", "Q4_K", "Q6_K"]
    return [{"layer": l, "expert": e, "proj": None, "type": cycle[(e + l) % 3]} for l in layers for e in range(n_experts)]


@pytest.mark.parametrize("per", ["tensor", "expert"])
def test_mixed_file_is_as_close_as_uniform(tiny, tmp_path, per) -> None:
    """A mixed file (per layer-projection, or per expert: typed groups, experts renumbered group by group)
    is as close to its dequantized HF reference as a uniform file is to its own."""
    import json
    arch, model = tiny
    tokens = sample_tokens(model)
    results = {}
    for name, extra in (("uniform", ["--uniform", "Q4_K"]), ("mixed", None)):
        if extra is None:
            uniform = json.loads((tmp_path / "uniform.json").read_text())
            layers = sorted({u["layer"] for u in uniform["units"]})
            plan_path = tmp_path / "plan.json"
            plan_path.write_text(json.dumps({"units": _mixed_units(layers, uniform["moe"]["n_experts"], per)}))
            extra = ["--plan", str(plan_path)]
        gguf = _convert(model, tmp_path / f"{name}.gguf", *extra, "--non-expert", "F32")
        report = json.loads(gguf.with_suffix(".json").read_text())
        layers = sorted({u["layer"] for u in report["units"]})
        plan = plan_from_units(report["units"], layers, report["moe"]["n_experts"])
        cmp = kld_vs_logits(llama_logits(gguf, tokens, RunOptions(f32_kv=True)), hf_logits(load_hf(model, plan), tokens))
        results[name] = cmp
    mixed = GGUFReader(tmp_path / "mixed.gguf")
    assert {t.tensor_type.name for t in mixed.tensors if "_exps" in t.name} >= {"Q2_K", "Q6_K"}
    assert ("gemq.expert_order" in mixed.fields) == (per == "expert")
    # llama.cpp quantizes activations (Q8_K), so neither file matches exactly; the mixed file must be as close.
    u, m = results["uniform"], results["mixed"]
    assert m.kld_mean <= max(2.0 * u.kld_mean, 2e-4), f"{arch}: mixed {m.kld_mean:.2e} vs uniform {u.kld_mean:.2e}"
    assert m.same_top_p >= u.same_top_p - 0.05
