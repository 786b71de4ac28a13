"""Hugging Face references for llama.cpp outputs: the same model, optionally with experts replaced by
exactly the weights llama.cpp holds (ggml-dequantized), so quantized files are compared like with like."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from gemq_gguf.archs import adapter_for
from gemq_gguf.ggml.quant import roundtrip
from gemq_gguf.plan import ExpertPlan


def load_hf(model_dir: Path, plan: ExpertPlan | None = None) -> torch.nn.Module:
    """The HF model in float32 (MoE kernels take no float64), with each planned expert matrix replaced by its ggml round trip."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
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


def sample_tokens(model_dir: Path, n: int = 96) -> list[int]:
    """Real text tokenized by the checkpoint's own tokenizer."""
    from gemq_gguf.data import eval_texts
    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok(eval_texts()["prose"][:4000])["input_ids"][:n]
