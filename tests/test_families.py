"""Every newer MoE family end to end, on a tiny seeded random checkpoint per family (tests/tiny_models.py):

1. `--uniform Q8_0` matches the Hugging Face model (mean KL <= 1e-3, top-1 >= 95 %) at token positions
   where no routing choice or top-1 token is near a tie (llama.cpp's 8-bit activations flip those);
2. GEMQ's shortcut cost of an expert equals re-running the model with it quantized (the change where
   calibration takes the gradient: the experts' output, or the block's where a shared expert joins it);
3. a `--budget` run writes a truly mixed grouped file that the patched runtime loads and runs as close
   to its own dequantized reference as the quantization allows, and the same Q4_K bytes split into
   3 groups give the same logits as a uniform file.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference import hf_logits, load_hf, load_hf_as_file, sample_tokens, stable_positions, wrapper_logits
from tiny_models import TOKENIZER_CODE, WRAPPERS, load_tokenizer, make_tiny_model

from gemq_gguf.archs import adapter_for
from gemq_gguf.evaluate import RunOptions, kld_vs_logits, llama_logits

FAMILIES = ["deepseek_v3", "glm4_moe", "gpt_oss", "qwen3_next", "qwen3_5_moe", "minimax_m2", "granitemoe", "dots1",
            "lfm2_moe", "glm4_moe_lite", "granitemoeshared", "granitemoehybrid", "exaone_moe", "solar_open", "hy_v3",
            "llama4", "ernie4_5_moe", "jamba", "dbrx", "nemotron_h", "cohere2_moe",
            "kimi_linear", "glm_moe_dsa", "mimo_v2_flash", "granitemoe_swa",
            "deepseek_v32", "dots3", "gemma4", "hunyuan_moe", "sarvam_moe", "afmoe", "laguna",
            # multimodal checkpoints, quantized through their text model (tests/tiny_models.py: WRAPPERS)
            "qwen3_5_moe_vl", "llama4_vl", "gemma4_vl", "qwen3_vl_moe_vl", "glm4v_moe_vl", "dots3_vl", "minimax_m3_vl",
            "qwen3_omni_moe_vl", "glm5_next_vl", "step3p7_vl"]


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory):
    """family -> its tiny checkpoint folder, built once per session."""
    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = make_tiny_model(family, root / family)
        return built[family]
    return get


def _convert(model: Path, out: Path, *args: str) -> Path:
    """The CLI on a tiny checkpoint; a family whose tokenizer is the checkpoint's code (this suite's own) runs it."""
    from gemq_gguf.cli import main as convert_main
    code = ("--trust-remote-code",) if model.name in TOKENIZER_CODE else ()
    assert convert_main([str(model), "-o", str(out), *args, *code]) == 0
    return out


def _stable_kl(model: Path, gguf: Path, ref: torch.nn.Module, wrapper: bool = False):
    """KL of the GGUF's next-token distributions against `ref`'s at the positions clear of ties; `wrapper`:
    against the multimodal checkpoint's own logits for the text (which must be `ref`'s)."""
    tokens = sample_tokens(model)
    keep = stable_positions(ref, tokens)
    assert keep.sum() >= len(tokens) // 2, f"only {keep.sum()} of {len(tokens)} positions are clear of ties"
    ours = llama_logits(gguf, tokens, RunOptions(f32_kv=True))
    want = hf_logits(ref, tokens)
    if wrapper:
        outer = wrapper_logits(model, tokens)
        assert abs(outer - want).max() <= 1e-5 * abs(outer).max()  # GEMQ's text model computes the wrapper's logits
        want = outer
    return kld_vs_logits(ours[keep], want[keep])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_matches_hf(family: str, tiny_family, tmp_path: Path) -> None:
    model = tiny_family(family)
    gguf = _convert(model, tmp_path / "q8.gguf", "--uniform", "Q8_0", "--non-expert", "Q8_0")
    cmp = _stable_kl(model, gguf, load_hf(model), wrapper=family in WRAPPERS)
    print(f"{family}: Q8_0 vs HF KL {cmp.kld_mean:.2e} top-1 {cmp.same_top_p:.3f}")
    assert cmp.kld_mean <= 1e-3 and cmp.same_top_p >= 0.95, (cmp.kld_mean, cmp.same_top_p)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_agrees_with_hf(family: str, tiny_family, family_f32) -> None:
    from llama_cpp import Llama
    model, gguf = tiny_family(family), family_f32(family)
    text = "def f(x):\n    return x ** 2  # squares, 12345 and café!"
    llm = Llama(str(gguf), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
        load_tokenizer(model)(text, add_special_tokens=False)["input_ids"]


def test_refused_classes_say_why() -> None:
    """A known MoE class we cannot convert faithfully is refused with its reason and the supported list."""
    from gemq_gguf.archs.registry import _REFUSED, supported
    from gemq_gguf.errors import GemqError
    assert _REFUSED and not set(_REFUSED) & set(supported())
    for hf_class, why in _REFUSED.items():
        with pytest.raises(GemqError) as err:
            adapter_for([hf_class])
        assert why in str(err.value) and "MixtralForCausalLM" in str(err.value)


def test_tokenizer_code_needs_the_flag(tiny_family, tmp_path: Path, capsys) -> None:
    """Hunyuan-MoE v1's tokenizer is the checkpoint's own code (a tiktoken module): without --trust-remote-code
    the conversion stops before any work with one line naming the flag, and the module never runs."""
    import shutil

    from test_cli_errors import _fails
    d = tmp_path / "hunyuan_moe"
    shutil.copytree(tiny_family("hunyuan_moe"), d)
    marker = tmp_path / "tokenizer-code-ran"
    module = d / "tokenization_hy.py"
    module.write_text(f"open({str(marker)!r}, 'w').close()\n" + module.read_text())
    _fails(capsys, tmp_path, [str(d), "--uniform", "Q8_0"], "--trust-remote-code")
    assert not marker.exists()


def test_tokenizer_code_missing_package(tiny_family, tmp_path: Path, capsys) -> None:
    """With the flag, a tokenizer module importing a package that is not installed (tiktoken, for Hunyuan-A13B)
    fails with one line naming the package, not a traceback."""
    import shutil

    from test_cli_errors import _fails
    d = tmp_path / "hunyuan_moe"
    shutil.copytree(tiny_family("hunyuan_moe"), d)
    module = d / "tokenization_hy.py"
    module.write_text(module.read_text().replace("import tiktoken\n", "import tiktoken_not_installed_xyz\n"))
    _fails(capsys, tmp_path, [str(d), "--uniform", "Q8_0", "--trust-remote-code"], "tiktoken_not_installed_xyz")


def test_converter_gets_the_keys_transformers_drops() -> None:
    """DeepSeek-V3 re-saved by transformers has no `scoring_func`: without it llama.cpp routes by softmax."""
    from gemq_gguf.archs import adapter_for
    v3 = adapter_for(["DeepseekV3ForCausalLM"])
    assert v3.converter_hparams({}) == {"scoring_func": "sigmoid"}
    assert v3.converter_hparams({"scoring_func": "softmax"}) == {}  # what the checkpoint says wins
    m2 = adapter_for(["MiniMaxM2ForCausalLM"]).converter_hparams(
        {"head_dim": 128, "hidden_size": 3072, "num_attention_heads": 48, "partial_rotary_factor": 0.5})
    assert m2 == {"scoring_func": "sigmoid", "rotary_dim": 64}


def test_converter_gets_sarvam_and_hunyuan_keys() -> None:
    """Sarvam-MoE's and Hunyuan-MoE v1's converters read the released config's names, which transformers' config
    classes rename or drop; a Sarvam re-save (named GLM-4.5's class by transformers) goes to the Sarvam converter."""
    saved = {"model_type": "sarvam_moe", "n_routed_experts": 8, "n_shared_experts": 1}
    sarvam = adapter_for(["SarvamMoEForCausalLM"])
    assert sarvam.converter_hparams(saved) == {"scoring_func": "sigmoid", "num_experts": 8, "num_shared_experts": 1}
    assert sarvam.converter_hparams({"score_function": "sigmoid", "num_experts": 128, "num_shared_experts": 1}) == {}
    assert adapter_for(["Glm4MoeForCausalLM"]).converter_hparams(saved)["architectures"] == ["SarvamMoEForCausalLM"]
    assert adapter_for(["Glm4MoeForCausalLM"]).converter_hparams({"model_type": "glm4_moe"}) == {}
    hy = adapter_for(["HunYuanMoEV1ForCausalLM"])
    assert hy.converter_hparams({"num_hidden_layers": 2, "intermediate_size": 256, "moe_topk": 2}) == \
        {"moe_intermediate_size": [256, 256], "num_shared_expert": [1, 1], "moe_topk": [2, 2]}
    assert hy.converter_hparams({"num_hidden_layers": 2, "intermediate_size": 256, "moe_topk": [8, 8],
                                 "moe_intermediate_size": [256, 256], "num_shared_expert": [1, 1]}) == {}


@pytest.mark.slow
def test_sarvam_resave_converts_as_sarvam(tiny_family, tmp_path: Path) -> None:
    """A transformers re-save of Sarvam-MoE names Glm4MoeForCausalLM over Sarvam's tensor names; it converts with
    the converter's Sarvam class (bailingmoe2), as the released checkpoint does (GLM's class stops at its vocabulary)."""
    import json
    import shutil

    import numpy as np
    from gguf import GGUFReader

    from gemq_gguf.convert.hf_to_gguf import hf_to_float_gguf
    d = tmp_path / "resave"
    shutil.copytree(tiny_family("sarvam_moe"), d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["Glm4MoeForCausalLM"]}))
    gguf = hf_to_float_gguf(d, tmp_path / "f32.gguf", "f32")
    assert GGUFReader(gguf).fields["general.architecture"].contents() == "bailingmoe2"
    tokens = sample_tokens(d)
    a, b = llama_logits(gguf, tokens, RunOptions(f32_kv=True)), hf_logits(load_hf(d), tokens)
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)


def test_afmoe_configs_llama_cpp_computes_differently_are_refused() -> None:
    """llama.cpp's AfMoE graph always scales the embeddings by sqrt(hidden) and ropes all but every 4th layer; a
    config that says otherwise is refused before any work (with mup_enabled false a tiny checkpoint's F32
    conversion was 56 % off, KL 1.6e-2). The converter gets `route_norm`, which transformers always applies."""
    from transformers import AutoConfig

    from gemq_gguf.errors import GemqError
    afmoe = adapter_for(["AfmoeForCausalLM"])
    small = dict(hidden_size=256, num_attention_heads=4, head_dim=64, num_experts=8, num_hidden_layers=4,
                 moe_intermediate_size=256, intermediate_size=512, vocab_size=384)
    assert afmoe.moe_shape(AutoConfig.for_model("afmoe", mup_enabled=True, **small)).moe_layers == (1, 2, 3)
    with pytest.raises(GemqError, match="mup_enabled"):
        afmoe.moe_shape(AutoConfig.for_model("afmoe", **small))
    with pytest.raises(GemqError, match="every 4th"):
        afmoe.moe_shape(AutoConfig.for_model("afmoe", mup_enabled=True, global_attn_every_n_layers=2, **small))
    assert afmoe.converter_hparams({}) == {"route_norm": True}
    assert afmoe.converter_hparams({"route_norm": False}) == {}


def test_minimax_m3_configs_llama_cpp_computes_differently_are_refused() -> None:
    """transformers' MiniMax-M3 rotates `partial_rotary_factor` of each head and ignores `rotary_dim`, which the
    converter writes (with rotary_dim 32 of 64 and no factor a tiny checkpoint's F32 conversion was 115 % off at
    worst, KL 2.4e-2, exact at the first token; exact with both saying 32); llama.cpp's graph fixes the layer
    layout. Such configs are refused before any work. The converter gets the released keys transformers drops."""
    from transformers import AutoConfig

    from gemq_gguf.errors import GemqError
    from tiny_models import COMMON, CONFIGS
    m3 = adapter_for(["MiniMaxM3SparseForConditionalGeneration"])
    text = {k: v for k, v in {**COMMON, **CONFIGS["minimax_m3_vl_text"]}.items() if k != "model_type"}
    assert m3.moe_shape(AutoConfig.for_model("minimax_m3_vl_text", **text)).moe_layers == (1, 2)
    with pytest.raises(GemqError, match="rotary_dim 32"):
        m3.moe_shape(AutoConfig.for_model("minimax_m3_vl_text", **{**text, "rope_parameters": None}))
    with pytest.raises(GemqError, match="dense layers first"):
        m3.moe_shape(AutoConfig.for_model("minimax_m3_vl_text", **{**text, "dense_intermediate_size": 512}))
    with pytest.raises(GemqError, match="dense layers first"):
        m3.moe_shape(AutoConfig.for_model("minimax_m3_vl_text", **{**text, "layer_types": ["full_attention"] * 3}))
    extra = m3.converter_hparams(AutoConfig.for_model("minimax_m3_vl_text", **text).to_dict())
    assert extra["moe_layer_freq"] == [0, 1, 1] and extra["n_shared_experts"] == 1
    assert extra["sparse_attention_config"]["sparse_topk_blocks"] == 8 and extra["scoring_func"] == "sigmoid"


def test_glm5_next_keys_and_streams() -> None:
    """The converter gets GLM-5.3-Flash's released keys that transformers flattens or drops; a hyper-connection count
    llama.cpp's graph does not run (it aborts the process on load) is refused before any work; its indexer's
    position embedding stays float (ggml's CPU add takes no quantized operand: the verify step aborted)."""
    from transformers import AutoConfig

    from gemq_gguf.archs.text_model import causal_lm_name
    from gemq_gguf.errors import GemqError
    from gemq_gguf.ggml.names import tensor_category
    from tiny_models import COMMON, CONFIGS
    g5 = adapter_for(["Glm5NextForConditionalGeneration"])
    text = {k: v for k, v in {**COMMON, **CONFIGS["glm5_next_text"]}.items() if k != "model_type"}
    causal_lm_name(type(AutoConfig.for_model("glm5_next_text", **text)))  # makes its causal LM, as text_config does
    assert g5.moe_shape(AutoConfig.for_model("glm5_next_text", **text)).moe_layers == (1, 2, 3)
    with pytest.raises(GemqError, match="hc_mult 2"):
        g5.moe_shape(AutoConfig.for_model("glm5_next_text", **{**text, "hc_mult": 2}))
    extra = g5.converter_hparams(AutoConfig.for_model("glm5_next_text", **text).to_dict())
    assert extra["linear_attn_config"] == {"num_heads": 4, "head_dim": 64, "short_conv_kernel_size": 4,
                                           "gate_lower_bound": -5.0}
    assert extra["mla_use_nope"] and extra["first_k_dense_replace"] == 1 and extra["scoring_func"] == "sigmoid"
    assert tensor_category("blk.3.indexer_compressor_ape.weight", 2) == "f32"


def test_step3p7_keys_and_experts() -> None:
    """The converter gets Step-3.7-Flash's released keys that transformers' config turns into its own (without them it
    stops at a KeyError); its experts module, outside the experts interface, is read with the layout given by the
    adapter (concatenated gate/up, [E, out, in]) and its own clamped GLU."""
    import torch
    from transformers import AutoConfig

    from gemq_gguf.archs.base import meta_model
    from gemq_gguf.archs.text_model import causal_lm_name
    from tiny_models import COMMON, CONFIGS
    step = adapter_for(["Step3p7ForConditionalGeneration"])
    cfg = AutoConfig.for_model("step3p5", **{k: v for k, v in {**COMMON, **CONFIGS["step3p5"]}.items()
                                             if k != "model_type"}, swiglu_limits=[0.0, 0.0, 0.0, 0.3])
    causal_lm_name(type(cfg))  # makes its causal LM, as text_config does
    extra = step.converter_hparams(cfg.to_dict())
    assert extra["moe_num_experts"] == 8 and extra["moe_top_k"] == 2 and extra["num_attention_groups"] == 2
    assert extra["moe_layers_enum"] == "1,2,3" and extra["rope_theta"] == [5e6, 1e4, 1e4, 1e4]
    assert extra["partial_rotary_factors"] == [0.5, 1.0, 1.0, 1.0] and extra["attention_other_setting"] == {
        "num_attention_heads": 8, "num_attention_groups": 2}
    assert step.moe_shape(cfg).moe_layers == (1, 2, 3)
    block = step.moe_block(meta_model(cfg).to_empty(device="cpu"), 3)
    view = step.experts(block)
    gate, up = torch.full((1, 256), 2.0), torch.full((1, 256), -1.0)
    # min(silu(2), 0.3) * clamp(-1, -0.3, 0.3): the gate clamped after its activation
    assert torch.allclose(view.glu(gate, up), torch.full((1, 256), -0.09))
    assert view.standard_act() is None


def test_laguna_layer_patterns_llama_cpp_cannot_run_are_refused() -> None:
    """llama.cpp's Laguna graph takes any sliding window as XS.2's pattern (every 4th layer full, from the first):
    full attention only converts without the window transformers saves (with it a tiny checkpoint's F32 conversion
    was 54 % off, KL 1.6e-2), another pattern and router softcapping are refused before any work."""
    from transformers import AutoConfig

    from gemq_gguf.errors import GemqError
    laguna = adapter_for(["LagunaForCausalLM"])
    small = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=8,
                 num_experts_per_tok=2, num_hidden_layers=4, moe_intermediate_size=256, vocab_size=384)
    xs2 = ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"]
    assert laguna.moe_shape(AutoConfig.for_model("laguna", layer_types=xs2, **small)).moe_layers == (1, 2, 3)
    assert laguna.moe_shape(AutoConfig.for_model("laguna", **small)).moe_layers == (1, 2, 3)  # full attention only
    with pytest.raises(GemqError, match="every 4th"):
        laguna.moe_shape(AutoConfig.for_model("laguna", layer_types=xs2[::-1], **small))
    with pytest.raises(GemqError, match="softcap"):
        laguna.moe_shape(AutoConfig.for_model("laguna", moe_router_logit_softcapping=30.0, **small))
    assert laguna.converter_hparams({"layer_types": ["full_attention"] * 4, "sliding_window": 512}) == \
        {"sliding_window": None}
    assert laguna.converter_hparams({"layer_types": xs2, "sliding_window": 512}) == {}


def test_converter_gets_the_released_names() -> None:
    """Kimi Linear and MiMo-V2-Flash re-saved by transformers lack the keys (and, Kimi, the dense-layer tensor
    names) llama.cpp's converter reads; a checkpoint that has them keeps its own."""
    kimi = adapter_for(["KimiLinearForCausalLM"])
    hp = {"layer_types": ["linear_attention", "full_attention"], "mlp_layer_types": ["dense", "sparse"],
          "linear_head_dim": 128, "linear_num_heads": 32, "linear_conv_kernel_dim": 4, "num_shared_experts": 1}
    extra = kimi.converter_hparams(hp)
    assert extra["linear_attn_config"]["full_attn_layers"] == [2] and extra["linear_attn_config"]["kda_layers"] == [1]
    assert extra["first_k_dense_replace"] == 1 and "num_shared_experts" not in extra
    assert kimi.converter_tensor_names(["model.layers.0.block_sparse_moe.up_proj.weight",
                                        "model.layers.1.block_sparse_moe.shared_experts.up_proj.weight"]) == \
        {"model.layers.0.block_sparse_moe.up_proj.weight": "model.layers.0.mlp.up_proj.weight"}
    mimo = adapter_for(["MiMoV2FlashForCausalLM"]).converter_hparams(
        {"head_dim": 192, "v_head_dim": 128, "num_attention_heads": 64, "num_key_value_heads": 4,
         "layer_types": ["full_attention", "sliding_attention"], "swa_num_key_value_heads": 8,
         "rope_parameters": {"full_attention": {"partial_rotary_factor": 0.334}}})
    assert mimo["hybrid_layer_pattern"] == [0, 1] and "swa_num_key_value_heads" not in mimo
    assert mimo["rope_parameters"]["partial_rotary_factor"] == 0.334


def test_selection_bias_moves_with_its_experts() -> None:
    """HY-V3's converter names the selection bias `exp_probs_b` without `.bias`; it must be renumbered too
    (before the fix its grouped file picked the wrong experts: KL 0.08 against its own weights)."""
    from gemq_gguf.ggml.names import EXPERT_AXIS_RE
    assert all(EXPERT_AXIS_RE.match(f"blk.1.{n}") for n in ("exp_probs_b", "exp_probs_b.bias", "ffn_gate_inp.weight",
                                                              "ffn_gate_exps.bias", "ffn_down_exps.bias"))
    assert not EXPERT_AXIS_RE.match("blk.1.ffn_norm.weight")


def test_recurrent_convolutions_stay_float() -> None:
    """llama.cpp's ssm_conv takes F32 weights only (and llama-quantize never quantizes them)."""
    from gemq_gguf.policy import TensorPolicy
    policy = TensorPolicy.from_args([], "Q8_0")
    assert policy.type_for("blk.0.ssm_conv1d.weight", 2) == "F32"
    assert policy.type_for("blk.0.shortconv.conv.weight", 2) == "F32"
    assert policy.type_for("blk.0.ssm_a", 2) == "F32"  # Mamba-2's A is [1, n_head]
    assert policy.type_for("blk.0.attn_q.weight", 2) == "Q8_0"


# ---------------------------------------------------------------- costs: shortcut == re-run of the block

def _moe_out(model: torch.nn.Module, adapter, layer: int, tokens: torch.Tensor) -> torch.Tensor:
    """The tensor at `layer` whose gradient calibration records as g (`hook_experts`), from a re-run of the
    whole model: the block computes its own routing from its own inputs, whatever feeds its router
    (the block's input, or the residual where the block is the decoder layer: Gemma 4)."""
    out: list[torch.Tensor] = []
    handles = adapter.hook_experts(adapter.moe_block(model, layer), lambda call: None, out.append)
    try:
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_shortcut_cost_equals_block_rerun(family: str, tiny_family) -> None:
    from test_costs import _dequantized, _load, _tokens

    from gemq_gguf.gemq.costs import estimate_costs
    from gemq_gguf.gemq.stats import collect_stats
    torch.set_num_threads(1)
    path = tiny_family(family)
    model = _load(path)
    adapter = adapter_for(model.config.architectures)
    tokens = _tokens(path, 2, 64)
    stats = collect_stats(model, adapter, tokens, store_dtype=torch.float64)
    cache: dict = {}
    table = estimate_costs(model, adapter, stats, stats.imatrix().means(), types=("Q2_K",),
                           dtype=torch.float64, cache=cache)
    layer = next(iter(stats.layers))
    block, s = adapter.moe_block(model, layer), stats.layers[layer]
    view = adapter.experts(block)
    width = {p: w.shape[1] for p, w in view.weights(0).items()}
    y = _moe_out(model, adapter, layer, tokens)
    checked = 0
    for expert in range(view.n_experts):
        if int(s.counts[expert]) == 0:
            continue
        for j, t in enumerate(table.types):
            wq = {p: _dequantized(cache, layer, expert, p, t, width[p]) for p in view.projs}
            orig = {p: w.detach().clone() for p, w in view.weights(expert).items()}
            view.set_weights(expert, wq)
            y_q = _moe_out(model, adapter, layer, tokens)
            view.set_weights(expert, orig)
            want = float(((s.g * (y - y_q).reshape(s.g.shape)) ** 2).sum())
            got = table.cost[table.units.index((layer, expert, None)), j]
            assert want > 0 and abs(got - want) <= 1e-5 * want, (family, expert, t, got, want)
        checked += 1
        if checked == 2:
            break
    assert checked == 2


@pytest.mark.parametrize("family", ["gemma4", "qwen3_next", "hunyuan_moe"])
def test_router_logits_reproduce_the_routing(family: str, tiny_family) -> None:
    """Router tuning's logits (`router_logits` of the input `router_input_hooks` records) pick the experts the
    model's experts call receives; Gemma 4's router reads the residual through its own norm and scale, not
    the block's (the decoder layer's) input; Hunyuan-MoE v1's router is nested (`gate.wg`)."""
    from gemq_gguf.gemq.routing import record_routing
    path = tiny_family(family)
    model = load_hf(path)
    adapter = adapter_for(model.config.architectures)
    with record_routing(model, adapter, logits=True) as routes, torch.no_grad():
        model(input_ids=torch.tensor([sample_tokens(path, 64)]))
    for layer in adapter.moe_shape(model.config).moe_layers:
        ids = routes.ids[layer][0].sort(dim=1).values
        z = routes.logits[layer][0].float()
        top = z.topk(ids.shape[1], dim=1).indices.sort(dim=1).values
        assert (top == ids).all(dim=1).float().mean() >= 0.95, (family, layer)


# ---------------------------------------------------------------- grouped files in the patched runtime

@pytest.fixture(scope="session")
def family_f32(tiny_family, tmp_path_factory: pytest.TempPathFactory):
    from gemq_gguf.convert.hf_to_gguf import hf_to_float_gguf
    root = tmp_path_factory.mktemp("families_f32")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = hf_to_float_gguf(tiny_family(family), root / f"{family}-f32.gguf", "f32")
        return built[family]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_split_groups_identical_logits(family: str, family_f32) -> None:
    from test_runtime_e2e import _require_patched, assert_split_groups_exact
    _require_patched()
    assert_split_groups_exact(family_f32(family), family)


#: candidate types of the mixed-file test where a family has a native expert type (the middle one):
#: gpt-oss's released experts are MXFP4
BUDGET_TYPES = {"gpt_oss": "Q2_K,MXFP4,Q6_K"}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_budget_file_is_grouped_and_runs(family: str, tiny_family, tmp_path: Path) -> None:
    from gguf import GGUFReader
    from test_runtime_e2e import _require_patched
    _require_patched()
    model = tiny_family(family)
    types = BUDGET_TYPES.get(family, "Q2_K,Q4_K,Q6_K")
    gguf = _convert(model, tmp_path / "gemq.gguf", "--budget", "4.0", "--types", types, "--non-expert",
                    "F32", "--calib-tokens", "1024", "--seq-len", "64")
    reader = GGUFReader(gguf)
    assert any(t.name.endswith(".qmap") for t in reader.tensors), "the allocation mixed no layer-projection"
    grouped = {t.tensor_type.name for t in reader.tensors if "_exps.q" in t.name}
    assert len(grouped) >= 2
    if family in BUDGET_TYPES:  # the family's native expert type takes part in the groups
        assert set(types.split(",")[1:2]) <= grouped, grouped
    cmp = _stable_kl(model, gguf, load_hf_as_file(model, gguf))
    print(f"{family}: grouped file vs its dequantized HF KL {cmp.kld_mean:.2e} top-1 {cmp.same_top_p:.3f}")
    assert cmp.kld_mean <= 1e-3 and cmp.same_top_p >= 0.95, (cmp.kld_mean, cmp.same_top_p)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(w for w, (_, text, _) in WRAPPERS.items() if text in FAMILIES))
def test_wrapper_converts_to_its_text_model(family: str, family_f32) -> None:
    """llama.cpp's converter writes a multimodal checkpoint's text model only: the same architecture and the
    same tensors, byte for byte, as the tiny text family whose weights the wrapper holds (no vision tensor)."""
    from gguf import GGUFReader
    import numpy as np
    ours, text = GGUFReader(family_f32(family)), GGUFReader(family_f32(WRAPPERS[family][1]))
    arch = [r.fields["general.architecture"].contents() for r in (ours, text)]
    assert arch[0] == arch[1], arch
    a, b = ({t.name: t for t in r.tensors} for r in (ours, text))
    assert a and a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type and np.array_equal(np.asarray(t.data), np.asarray(b[name].data)), name
