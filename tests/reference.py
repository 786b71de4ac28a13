"""Hugging Face references for llama.cpp outputs: the same model, optionally with experts replaced by
exactly the weights llama.cpp holds (ggml-dequantized), so quantized files are compared like with like."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tiny_models import load_tokenizer
from transformers import AutoConfig

from gemq_gguf.archs import adapter_for, load_text_model
from gemq_gguf.ggml.quant import roundtrip
from gemq_gguf.plan import ExpertPlan


def load_hf(model_dir: Path, plan: ExpertPlan | None = None) -> torch.nn.Module:
    """The HF model in float32 (MoE kernels take no float64), with each planned expert matrix replaced by its ggml round
    trip; a multimodal checkpoint's text model (what GEMQ quantizes)."""
    model = load_text_model(model_dir, dtype=torch.float32).eval()
    if plan:
        adapter = adapter_for(AutoConfig.from_pretrained(model_dir).architectures)
        for (layer, proj), types in plan.items():
            view = adapter.experts(adapter.moe_block(model, layer))
            for e, t in enumerate(types):
                view.set_weights(e, {proj: torch.from_numpy(roundtrip(view.weight(proj, e).detach().float().numpy(), t))})
    return model


@torch.no_grad()
def hf_logits(model: torch.nn.Module, tokens: list[int]) -> np.ndarray:
    return model(input_ids=torch.tensor([tokens])).logits[0].double().numpy()


@torch.no_grad()
def wrapper_logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    """A multimodal checkpoint's logits for text alone, from its own class (vision tower and all). Where the
    wrapper's language model is itself a causal LM (Llama 4) its call gives them: the wrapper's forward passes
    text straight to it (and in transformers 5.24 fails after it, reading `image_outputs` off its output).
    Qwen3-Omni's wrapper only generates: its thinker (towers, text model and LM head) gives the logits."""
    import transformers
    from transformers import AutoConfig
    cls = getattr(transformers, AutoConfig.from_pretrained(model_dir).architectures[0])
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    if hasattr(model, "thinker"):
        run = model.thinker
    else:
        lm = model.get_decoder()
        run = lm if lm.get_output_embeddings() is not None else model
    return run(input_ids=torch.tensor([tokens])).logits[0].double().numpy()


def sample_tokens(model_dir: Path, n: int = 96) -> list[int]:
    """Real text tokenized by the checkpoint's own tokenizer."""
    from gemq_gguf.data import eval_texts
    tok = load_tokenizer(model_dir)
    return tok(eval_texts()["prose"][:4000])["input_ids"][:n]


@torch.no_grad()
def stable_positions(model: torch.nn.Module, tokens: list[int], *, noise: float = 0.01, draws: int = 4,
                     top1_margin: float = 0.1, seed: int = 0) -> np.ndarray:
    """Token positions where neither a routing choice nor the top-1 token is near a tie (bool [T]).

    llama.cpp quantizes activations to 8 bits, which flips near-ties; a flipped expert is a different model,
    not a conversion error. A routing choice is near a tie when noise of `noise` x the RMS on every MoE
    block's router input changes the experts a position picks in any layer (over `draws` seeded draws): this
    covers every family's scoring (softmax, sigmoid with bias correction, group-limited top-k) without
    re-implementing it. The top-1 token is near a tie when its logit leads the second by less than
    `top1_margin` x the logits' standard deviation."""
    from gemq_gguf.gemq.hooks import experts_hooks
    adapter = adapter_for(model.config.architectures)
    ids = torch.tensor([tokens])

    def routing(scale: float, gen: torch.Generator | None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        picked: dict[int, torch.Tensor] = {}

        def make_hook(layer, view):
            def hook(call, out):
                picked[layer] = call.ids.reshape(len(tokens), -1).sort(dim=1).values
            return hook

        def perturb(m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            x = x + scale * x.pow(2).mean().sqrt() * torch.randn(x.shape, generator=gen, dtype=x.dtype)
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
        layers = adapter.moe_shape(model.config).moe_layers
        handles = [adapter.router_input_module(adapter.moe_block(model, l)).register_forward_pre_hook(
                   perturb, with_kwargs=True)
                   for l in layers] if scale else []
        try:
            with experts_hooks(model, adapter, make_hook):
                logits = model(input_ids=ids).logits[0]
        finally:
            for h in handles:
                h.remove()
        return picked, logits

    base, logits = routing(0.0, None)
    stable = torch.ones(len(tokens), dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(draws):
        picked, _ = routing(noise, gen)
        for layer, chosen in base.items():
            stable &= (picked[layer] == chosen).all(dim=1)
    top2 = logits.topk(2, dim=-1).values
    stable &= (top2[:, 0] - top2[:, 1]) >= top1_margin * logits.std(dim=-1)
    return stable.numpy()


def load_hf_as_file(model_dir: Path, gguf_path: Path) -> torch.nn.Module:
    """The HF model with every routed-expert matrix replaced by exactly what `gguf_path` stores for it
    (ggml-dequantized, groups and renumbering undone): the reference for a file quantized with an imatrix."""
    import json

    from gguf import GGUFReader

    from gemq_gguf.ggml.names import parse_expert_name
    from gemq_gguf.ggml.quant import dequantize
    reader = GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    field = reader.fields.get("gemq.expert_order")
    orders = {int(k): v for k, v in json.loads(field.contents()).items()} if field is not None else {}

    def matrices(t) -> np.ndarray:  # [n, n_out, n_in] float32
        n_in = int(t.shape[0])
        data = np.asarray(t.data)
        return dequantize(data.reshape(-1, data.shape[-1]), t.tensor_type.name, n_in).reshape(data.shape[0], -1, n_in)

    model = load_hf(model_dir)
    adapter = adapter_for(AutoConfig.from_pretrained(model_dir).architectures)
    stems = {n.removesuffix(".qmap") for n in tensors if n.endswith(".qmap")}
    for stem in sorted(stems | {n.removesuffix(".weight") for n in tensors if parse_expert_name(n)}):
        layer, proj = parse_expert_name(stem + ".weight")
        if stem in stems:  # grouped: file expert i is row qmap[g, i] of group g
            qmap = np.asarray(tensors[stem + ".qmap"].data)
            groups = [matrices(tensors[f"{stem}.q{g}.weight"]) for g in range(qmap.shape[0])]
            w = np.stack([groups[g][qmap[g, i]] for i in range(qmap.shape[1]) for g in range(qmap.shape[0])
                          if qmap[g, i] >= 0])
        else:
            w = matrices(tensors[stem + ".weight"])
        order = orders.get(layer, list(range(w.shape[0])))  # file expert i is model expert order[i]
        view = adapter.experts(adapter.moe_block(model, layer))
        for i, e in enumerate(order):  # a merged gate/up (ffn_gate_up_exps) holds gate rows, then up rows
            parts = {proj: w[i]} if proj != "gate_up" else {"gate": w[i][:view.ffn], "up": w[i][view.ffn:]}
            view.set_weights(e, {p: torch.from_numpy(x) for p, x in parts.items()})
    return model
