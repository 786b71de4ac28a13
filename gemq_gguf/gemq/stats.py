"""Calibration statistics for GEMQ, from one forward + backward pass over the calibration tokens.

For every MoE layer we keep what the cost of quantizing any expert needs:
the experts' input x [T, H], the gradient g [T, H] of the LM loss w.r.t. the experts' summed output (or
the block's, routed plus shared part, where the adapter hooks that: `ArchAdapter.hook_experts`), the routing (ids, weights [T, k]), and per expert the
importance matrix sums (Σ x² for gate/up inputs, Σ (act(gate x)·up x)² for down inputs) and token
counts, exactly what llama.cpp's imatrix tool accumulates.

How: a hook on each MoE block's experts call records x and the routing and accumulates the imatrix; a
tensor hook on its output records g during backward. The loss is Σ_seq mean_token CE, so g does not
depend on the batch size. Parameters get no gradients (only activations do), which keeps backward
memory at one batch's activations. With `tensor_tokens`, hooks on the other linears and the embedding
record what their costs need (tensor_stats.py) in the same pass.

Memory trade-off: the whole model is held on the device (or spread over GPUs by `accelerate`'s
device_map when it is installed), and x and g cost 2 · n_moe_layers · T · H values (bf16 by default:
32k tokens × 2048 hidden × 24 layers ≈ 6 GiB). Past `ram_limit` bytes they go to np.memmap files in a
work directory, so RAM holds only the model and one batch. `streaming.stream_stats` gives the same
statistics holding one decoder layer's weights at a time (`--calib-memory`).
"""
from __future__ import annotations

import importlib.util
import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..archs import ArchAdapter, ExpertsCall, ExpertsView, MoeShape, load_text_model
from ..ggml.imatrix import Imatrix
from ..ggml.names import expert_tensor_name
from ..options import FISHER_LABELS
from .experts_math import expert_hidden
from .buffers import host_buffer, spill_directory
from .hooks import ExpertsHook, experts_hooks, frozen
from .tensor_stats import TensorRecorder, TensorStats, new_tensor_stats, tensor_hooks, tied_head

DEFAULT_RAM_LIMIT = 2 * 2**30


@dataclass
class LayerStats:
    """One MoE layer's calibration record (tokens in calibration order)."""

    layer: int
    x: torch.Tensor          # [T, H] input of the routed experts, store dtype
    g: torch.Tensor          # [T, H] dLoss / d (routed experts' output), store dtype
    ids: torch.Tensor        # [T, k] int64 selected experts
    weights: torch.Tensor    # [T, k] float32 routing weights
    in_sum2: torch.Tensor    # [E, H] float64: Σ x² over tokens routed to each expert
    down_sum2: torch.Tensor  # [E, I] float64: Σ glu(gate x, up x)² over the same tokens (down's input)
    counts: torch.Tensor     # [E] int64: tokens routed to each expert

    def routed(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token indices, routing weights) of the tokens that chose `expert` (a token picks it at most once)."""
        hit = self.ids == expert
        tok = hit.any(dim=1).nonzero().squeeze(1)
        return tok, (self.weights * hit).sum(dim=1)[tok]


@dataclass
class CalibStats:
    """Everything the cost estimation needs; `layers` is keyed by model layer index."""

    layers: dict[int, LayerStats]
    n_seq: int
    seq_len: int
    loss: float
    projs: tuple[str, ...] = ("gate", "up", "down")
    datasets: list[str] = field(default_factory=list)
    work_dir: Path | None = None
    tensors: TensorStats | None = None  # the non-expert weights' records (tensor_stats.py), when recorded

    def imatrix(self) -> Imatrix:
        """The importance matrices of the routed experts and of the recorded non-expert linears, keyed by
        GGUF tensor name (llama.cpp's raw sums/counts)."""
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, np.ndarray] = {}
        for l, s in self.layers.items():
            c = s.counts.numpy().astype(np.float32)
            for proj in self.projs:
                src = s.down_sum2 if proj == "down" else s.in_sum2
                name = expert_tensor_name(l, proj)
                sums[name] = src.numpy().astype(np.float32)
                counts[name] = c
        if self.tensors is not None:
            tsums, tcounts = self.tensors.imatrix_entries()
            sums.update(tsums)
            counts.update(tcounts)
        return Imatrix(sums=sums, counts=counts, datasets=list(self.datasets), chunk_size=self.seq_len,
                       chunk_count=self.n_seq)


def _accumulate_imatrix(view: ExpertsView, call: ExpertsCall, x: torch.Tensor, s: LayerStats) -> None:
    ids = call.ids
    for e in ids.unique().tolist():
        hit = ids == e
        tok = hit.any(dim=1)
        xe = x[tok]
        if view.input_weighted:  # the expert's input is w x (what llama.cpp's imatrix sees too)
            xe = xe * (call.weights * hit).sum(dim=1)[tok, None].to(xe.dtype)
        h = expert_hidden(view, xe, view.weights(e), e)
        s.in_sum2[e] += (xe.double() ** 2).sum(0).cpu()
        s.down_sum2[e] += (h.double() ** 2).sum(0).cpu()
        s.counts[e] += int(tok.sum())


class StatsRecorder:
    """Hooks on every MoE block's experts call; `offset` locates the current batch in the token buffers."""

    def __init__(self, adapter: ArchAdapter, stats: dict[int, LayerStats]) -> None:
        self.adapter, self.stats = adapter, stats
        self.offset = 0

    def hook(self, layer: int, view: ExpertsView) -> ExpertsHook:
        def hook(call: ExpertsCall, out: torch.Tensor) -> None:
            s, start = self.stats[layer], self.offset
            x = call.x.detach().reshape(-1, call.x.shape[-1])
            end = start + x.shape[0]
            with torch.no_grad():
                s.x[start:end] = x.to(s.x.dtype).cpu()
                s.ids[start:end] = call.ids.cpu()
                s.weights[start:end] = call.weights.float().cpu()
                _accumulate_imatrix(view, call, x, s)

            def grad_hook(grad: torch.Tensor) -> None:
                s.g[start:end] = grad.detach().reshape(-1, grad.shape[-1]).to(s.g.dtype).cpu()
            if out.requires_grad:
                out.register_hook(grad_hook)
        return hook



def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ over sequences of the mean next-token cross-entropy against `targets` [B, L-1] (batch-size
    independent gradients)."""
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum")
    return ce / targets.shape[1]


def gradient_targets(logits: torch.Tensor, tokens: torch.Tensor, labels: str, gen: torch.Generator) -> torch.Tensor:
    """Next-token targets for the gradient: the text's own tokens (`data`: empirical Fisher) or one draw
    from the model's predictive distribution per position (`sampled`: an unbiased estimate of the true
    Fisher, which is the Hessian of the KL divergence to the unquantized model, the metric we ship by)."""
    if labels == "data":
        return tokens[:, 1:].to(logits.device)
    with torch.no_grad():
        probs = torch.softmax(logits[:, :-1].float(), dim=-1).reshape(-1, logits.shape[-1])
        return torch.multinomial(probs, 1, generator=gen).reshape(tokens.shape[0], -1)


def collect_stats(model: nn.Module, adapter: ArchAdapter, tokens: torch.Tensor, *, batch_size: int = 4,
                  store_dtype: torch.dtype = torch.bfloat16, ram_limit: int = DEFAULT_RAM_LIMIT,
                  work_dir: Path | None = None, datasets: list[str] | None = None,
                  labels: str = FISHER_LABELS[0], seed: int = 0, tensor_tokens: int = 0,
                  progress: bool = False) -> CalibStats:
    """Forward + backward over `tokens` [n_seq, L]; returns per-MoE-layer x, g, routing and imatrix sums,
    and with `tensor_tokens` > 0 the non-expert weights' records on about that many tokens (tensor_stats.py).

    x and g live in RAM when 2·layers·T·H values fit `ram_limit` bytes, else in memmap files in a fresh
    directory under `work_dir` (the system temp dir when None), deleted with the returned statistics.
    """
    if labels not in FISHER_LABELS:
        raise ValueError(f"labels must be one of {FISHER_LABELS}, not {labels!r}")
    shape = adapter.moe_shape(model.config)
    n_seq, seq_len = tokens.shape
    stats, spill_dir = new_layer_stats(shape, n_seq * seq_len, store_dtype, ram_limit, work_dir)

    device = model.get_input_embeddings().weight.device
    # the embedding output requires grad, so backward reaches the MoE blocks' outputs with every weight frozen
    embed_hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    recorder = StatsRecorder(adapter, stats)
    tensors, trec = new_tensor_recorder(model, adapter, tokens, tensor_tokens, store_dtype, ram_limit, work_dir)
    total = 0.0
    gen: torch.Generator | None = None  # made on the logits' device: draws happen where the logits are
    try:
        with frozen(model), experts_hooks(model, adapter, recorder.hook), tensor_hooks(model, trec):
            starts = range(0, n_seq, batch_size)
            if progress:
                from tqdm import tqdm
                starts = tqdm(starts, desc="calibration", unit="batch")
            for start in starts:
                batch = tokens[start:start + batch_size].to(device)
                recorder.offset = start * seq_len
                if trec is not None:
                    trec.begin(start * seq_len)
                logits = model(input_ids=batch, use_cache=False).logits
                if gen is None:
                    gen = torch.Generator(device=logits.device).manual_seed(seed)
                loss = sequence_loss(logits, gradient_targets(logits, batch, labels, gen))
                loss.backward()
                total += float(loss.detach())
    finally:
        embed_hook.remove()
    return finish_stats(stats, tokens, total / n_seq, shape, datasets, spill_dir, tensors)


def new_tensor_recorder(model: nn.Module, adapter: ArchAdapter, tokens: torch.Tensor, tensor_tokens: int,
                        store_dtype: torch.dtype, ram_limit: int,
                        work_dir: Path | None) -> tuple[TensorStats | None, TensorRecorder | None]:
    """The non-expert records and their recorder, or (None, None) when `tensor_tokens` is 0."""
    if tensor_tokens <= 0:
        return None, None
    n_layers = len(adapter.decoder_layers(model))
    tensors, by_module = new_tensor_stats(model, n_layers, tokens, tensor_tokens,
                                          tied_head(model, adapter.needs_output_tensor), store_dtype, ram_limit,
                                          work_dir)
    return tensors, TensorRecorder(tensors, by_module, store_dtype)


def new_layer_stats(shape: MoeShape, n_tok: int, store_dtype: torch.dtype, ram_limit: int,
                    work_dir: Path | None) -> tuple[dict[int, LayerStats], Path | None]:
    """Zeroed records of every MoE layer; x and g in memmap files in a fresh directory under `work_dir`
    (returned, else None) when they would not fit `ram_limit` bytes."""
    spill = stats_bytes(len(shape.moe_layers), n_tok, shape.hidden, store_dtype) > ram_limit
    spill_dir = spill_directory(work_dir, "gemq-stats-") if spill else None
    stats = {l: LayerStats(
        layer=l,
        x=host_buffer((n_tok, shape.hidden), store_dtype, spill_dir / f"x{l}.bin" if spill_dir else None),
        g=host_buffer((n_tok, shape.hidden), store_dtype, spill_dir / f"g{l}.bin" if spill_dir else None),
        ids=torch.zeros((n_tok, shape.top_k), dtype=torch.int64),
        weights=torch.zeros((n_tok, shape.top_k), dtype=torch.float32),
        in_sum2=torch.zeros((shape.n_experts, shape.hidden), dtype=torch.float64),
        down_sum2=torch.zeros((shape.n_experts, shape.expert_ffn), dtype=torch.float64),
        counts=torch.zeros(shape.n_experts, dtype=torch.int64)) for l in shape.moe_layers}
    return stats, spill_dir


def finish_stats(stats: dict[int, LayerStats], tokens: torch.Tensor, loss: float, shape: MoeShape,
                 datasets: list[str] | None, spill_dir: Path | None, tensors: TensorStats | None = None) -> CalibStats:
    """The statistics record; memmap files (if any) are deleted when it goes."""
    n_seq, seq_len = tokens.shape
    result = CalibStats(layers=stats, n_seq=n_seq, seq_len=seq_len, loss=loss, projs=shape.projs,
                        datasets=list(datasets or []), work_dir=spill_dir, tensors=tensors)
    if spill_dir is not None:
        weakref.finalize(result, shutil.rmtree, spill_dir, ignore_errors=True)
    return result


def load_for_calibration(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The HF model on the best device, spread over GPUs when `accelerate` is installed.

    Default dtype keeps every weight's exact value (so quantized bytes cached during cost estimation
    equal the writer's): bf16 on GPU for bf16 checkpoints, float32 otherwise (`calibration_dtype`).
    Only safetensors are read (no pickled .bin, whatever the folder holds), and no checkpoint code runs.
    A multimodal checkpoint gives its text model (`archs/text_model.py`).
    """
    from transformers import AutoConfig
    cuda = torch.cuda.is_available()
    dtype = dtype or calibration_dtype(AutoConfig.from_pretrained(path))
    if cuda and torch.cuda.device_count() > 1 and importlib.util.find_spec("accelerate"):
        return load_text_model(path, dtype=dtype, device_map="auto").eval()
    return load_text_model(path, dtype=dtype).to("cuda" if cuda else "cpu").eval()


def calibration_dtype(config: object) -> torch.dtype:
    """The dtype calibration computes in: it keeps every weight's exact value (so quantized bytes cached
    during cost estimation equal the writer's): bf16 on GPU for bf16 checkpoints, float32 otherwise."""
    stored = getattr(config, "dtype", None)
    return torch.bfloat16 if torch.cuda.is_available() and stored in (torch.bfloat16, "bfloat16") else torch.float32


def stats_bytes(n_moe_layers: int, n_tokens: int, hidden: int, store_dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes that x and g take for a run (to size `ram_limit` and the work directory)."""
    return 2 * n_moe_layers * n_tokens * hidden * torch.empty(0, dtype=store_dtype).element_size()
