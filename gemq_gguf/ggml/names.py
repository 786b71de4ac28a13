"""GGUF tensor names: the routed-expert tensors, routers, and tensor categories.

Names come from gguf-py's own tables (`TENSOR_NAMES`), so they are what llama.cpp's converter writes and
its loader looks up. The grouped layout's names are ours (`layout.py`).
"""
from __future__ import annotations

import re

from gguf import MODEL_TENSOR, TENSOR_NAMES

#: projections of a routed expert as plans, costs and reports key them (gate_up: a merged tensor)
PROJS = ("gate", "up", "down")
EXPERT_PROJS = PROJS + ("gate_up",)
_EXPERT_TENSORS = {"gate": MODEL_TENSOR.FFN_GATE_EXP, "up": MODEL_TENSOR.FFN_UP_EXP,
                   "down": MODEL_TENSOR.FFN_DOWN_EXP, "gate_up": MODEL_TENSOR.FFN_GATE_UP_EXP}
ROUTER = TENSOR_NAMES[MODEL_TENSOR.FFN_GATE_INP].split(".")[-1]                 # ffn_gate_inp
SHEXP_GATE = TENSOR_NAMES[MODEL_TENSOR.FFN_GATE_INP_SHEXP].split(".")[-1]       # ffn_gate_inp_shexp
EXP_PROBS_B = TENSOR_NAMES[MODEL_TENSOR.FFN_EXP_PROBS_B].split(".")[-1]         # exp_probs_b


def _suffix(t: MODEL_TENSOR) -> str:
    return TENSOR_NAMES[t].split(".", 2)[2]


_EXP = "|".join(re.escape(_suffix(t)) for t in _EXPERT_TENSORS.values())
#: a routed-expert weight tensor: group 1 the layer, group 2 the projection
EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(" + "|".join(EXPERT_PROJS) + r")_exps\.weight$")
#: tensors with one row (or entry) per routed expert, besides the expert matrices: renumbered with them
#: (HY-V3's converter writes the selection bias without the `.bias` suffix)
EXPERT_AXIS_RE = re.compile(rf"^blk\.(\d+)\.({re.escape(ROUTER)}\.(weight|bias)|{re.escape(EXP_PROBS_B)}(\.bias)?|"
                            rf"({_EXP})\.\w+)$")
assert EXPERT_RE.match(TENSOR_NAMES[MODEL_TENSOR.FFN_GATE_UP_EXP].format(bid=0) + ".weight")


def expert_tensor_name(layer: int, proj: str) -> str:
    """GGUF name of a layer's stacked routed-expert tensor; `proj` is gate, up, down (or gate_up)."""
    return TENSOR_NAMES[_EXPERT_TENSORS[proj]].format(bid=layer) + ".weight"


def parse_expert_name(name: str) -> tuple[int, str] | None:
    """(layer, projection) of a routed-expert weight tensor name, else None."""
    m = EXPERT_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def router_tensor_name(layer: int, suffix: str = ROUTER) -> str:
    """GGUF name of a router weight (`ffn_gate_inp`, or the shared-expert gate `ffn_gate_inp_shexp`)."""
    return f"blk.{layer}.{suffix}.weight"


#: parts of names of 2-D tensors that llama-quantize never quantizes (llama-quant.cpp; nor anything whose
#: name does not end in `.weight`, e.g. Mamba-2's [1, n_head] `ssm_a`): norms, recurrent
#: layers' small convolution weights (llama.cpp's ssm_conv kernel takes only F32 weights), GLM-5.3-Flash's
#: indexer position embedding (added to activations: ggml's CPU add takes no quantized operand), ...
KEEP_FLOAT = ("_norm.weight", "ssm_conv1d", "shortconv.conv.weight", "altup", "laurel", "per_layer_model_proj",
              "indexer.k_proj.weight", "indexer.q_proj.weight", "attn_rel_b.weight", ".position_embd",
              "indexer_compressor_ape")

#: categories of non-expert tensors (typed by policy, or by the whole-file allocation)
CATEGORIES = ("embd", "output", "attn", "shexp", "ffn", "router", "other")


def tensor_category(name: str, n_dims: int) -> str:
    """'f32' for 1-D tensors and biases, 'expert' for routed experts, else one of CATEGORIES."""
    if n_dims <= 1 or not name.endswith(".weight") or any(k in name for k in KEEP_FLOAT):
        return "f32"
    if EXPERT_RE.match(name):
        return "expert"
    if f".{ROUTER}" in name or f".{EXP_PROBS_B}" in name:
        return "router"
    if name.startswith(TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD]):
        return "embd"
    if name.startswith(TENSOR_NAMES[MODEL_TENSOR.OUTPUT]):
        return "output"
    if ".attn_" in name:
        return "attn"
    if "_shexp" in name:
        return "shexp"
    if re.search(r"\.ffn_(gate|up|down)\.", name):
        return "ffn"
    return "other"
