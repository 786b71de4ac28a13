"""Exact zero-padding of a Llama-style model's hidden size (and attention heads).

llama.cpp's K-quants and IQ types need every weight row (the input width, GGUF ne0) to be a multiple of 256.
SmolLM2 has hidden 576 and 9 query heads of 64 (q_proj out / o_proj in = 576), so the demo model pads:

* the hidden size 576 -> 768 with zero columns (embeddings, q/k/v/gate/up/router inputs) and zero rows (o_proj and
  down_proj outputs). The padded coordinates of the residual stream stay exactly 0 in every layer.
* every RMSNorm: with d zeros appended, mean(x^2) shrinks by H/H'; scaling the norm weights by sqrt(H/H') and eps by
  H/H' makes the normalised output (on the real coordinates) identical: w' x / sqrt(H/H' (m + eps)) = w x / sqrt(m+eps).
* the query heads 9 -> 12 (head_dim stays 64, so the attention width becomes 768 = hidden and o_proj is 768 wide):
  one all-zero query head is added to each of the 3 GQA groups (3 real + 1 zero query head per KV head); its o_proj
  columns are zero, so whatever it attends to contributes nothing.

The padded model computes the same function (up to float rounding) and stays a plain Llama/Mixtral to every loader.
"""
from __future__ import annotations

import math

import torch


def head_layout(n_head: int, n_kv: int, n_head_new: int) -> list[int]:
    """Position of each original query head in the padded head list. Heads stay in their GQA group (HF and llama.cpp
    both map query head i to KV head i // (n_head / n_kv)); the new zero heads go at the end of each group."""
    if n_head % n_kv or n_head_new % n_kv or n_head_new < n_head:
        raise ValueError(f"cannot pad {n_head} query heads ({n_kv} KV heads) to {n_head_new}")
    g, g_new = n_head // n_kv, n_head_new // n_kv
    return [(j // g) * g_new + j % g for j in range(n_head)]


def padded_heads(hidden_new: int, head_dim: int, n_head: int, n_kv: int) -> int:
    """Query heads of the padded model: hidden_new / head_dim when that is a valid GQA layout, else unchanged."""
    if hidden_new % head_dim == 0:
        h = hidden_new // head_dim
        if h >= n_head and h % n_kv == 0:
            return h
    return n_head


def _pad_in(w: torch.Tensor, n: int) -> torch.Tensor:
    """Zero columns: input width -> n."""
    return torch.cat([w, w.new_zeros(w.shape[0], n - w.shape[1])], 1) if n > w.shape[1] else w


def _pad_out(w: torch.Tensor, n: int) -> torch.Tensor:
    """Zero rows: output width -> n."""
    return torch.cat([w, w.new_zeros(n - w.shape[0], *w.shape[1:])], 0) if n > w.shape[0] else w


def _spread_heads(w: torch.Tensor, pos: list[int], n_head_new: int, head_dim: int, dim: int) -> torch.Tensor:
    """Place head j's rows (dim=0) or columns (dim=1) of w at head pos[j] of a zero tensor with n_head_new heads."""
    shape = list(w.shape)
    shape[dim] = n_head_new * head_dim
    out = w.new_zeros(shape)
    for j, p in enumerate(pos):
        src = w.narrow(dim, j * head_dim, head_dim)
        out.narrow(dim, p * head_dim, head_dim).copy_(src)
    return out


def pad_state_dict(sd: dict[str, torch.Tensor], hidden: int, hidden_new: int, n_head: int, n_kv: int,
                   head_dim: int, n_head_new: int) -> dict[str, torch.Tensor]:
    """Pad a Llama/Mixtral state dict (HF names). Any 2-D weight whose input width is `hidden` gets zero columns,
    outputs into the residual stream (o_proj, down_proj, Mixtral w2) get zero rows, norms are scaled."""
    s = math.sqrt(hidden / hidden_new)
    pos = head_layout(n_head, n_kv, n_head_new)
    out = {}
    for k, w in sd.items():
        if k.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, model.norm
            w = _pad_out(w * s, hidden_new)
        elif k.endswith("self_attn.q_proj.weight"):
            w = _pad_in(_spread_heads(w, pos, n_head_new, head_dim, 0), hidden_new)
        elif k.endswith("self_attn.o_proj.weight"):
            w = _pad_out(_spread_heads(w, pos, n_head_new, head_dim, 1), hidden_new)
        elif k.endswith(("mlp.down_proj.weight", ".w2.weight")):
            w = _pad_out(w, hidden_new)
        elif w.dim() == 2 and w.shape[1] == hidden:  # embeddings, lm_head, k/v, gate/up, w1/w3, router
            w = _pad_in(w, hidden_new)
        else:
            raise ValueError(f"do not know how to pad {k} {tuple(w.shape)}")
        out[k] = w.contiguous()
    return out


def pad_llama(model, hidden_new: int):
    """A new LlamaForCausalLM (float32, eval) computing the same function as `model` with hidden size hidden_new."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_head_new = padded_heads(hidden_new, head_dim, c.num_attention_heads, c.num_key_value_heads)
    d = c.to_dict()
    d.update(hidden_size=hidden_new, num_attention_heads=n_head_new, head_dim=head_dim,
             rms_norm_eps=c.rms_norm_eps * c.hidden_size / hidden_new)
    for k in ("architectures", "model_type", "transformers_version"):
        d.pop(k, None)
    cfg = LlamaConfig(**d)
    sd = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and c.tie_word_embeddings)}
    sd = pad_state_dict(sd, c.hidden_size, hidden_new, c.num_attention_heads, c.num_key_value_heads, head_dim,
                        n_head_new)
    new = LlamaForCausalLM(cfg)
    missing, unexpected = new.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    new.tie_weights()
    return new.float().eval()
