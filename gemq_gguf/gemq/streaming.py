"""Layer-streamed calibration statistics: the whole-model pass of `stats.collect_stats`, in memory
bounded by one decoder layer's weights, on the engine of `layer_pass.py`.

Forward: embeddings, then every layer over all batches keeping the layer-boundary hidden states. The
head gives each batch's logits, the loss (the same `sequence_loss` against the same targets: `--fisher
sampled` draws in the same order from the same seeded generator) and its gradient at the last boundary.
Backward: from the top layer down, each layer's forward is recomputed from its saved input and the
boundary gradient pushed through it. The MoE hooks of `stats.StatsRecorder` fire during that
recomputation, so x, the routing, the imatrix sums and g at every MoE block's output are exactly those
of the whole-model pass. The non-expert records (tensor_stats.py) come from the same recomputation (the
LM head's from the head pass); the gradient at the embedding's output from one more pass through the
embeddings, fed the gradient at the first layer's input.

Cost: one extra forward per layer (the recomputation) and reading each layer's weights twice.
Memory: one layer's weights, the embeddings or head while they run, the boundary states
((layers + 1) · tokens · hidden values at the compute dtype, spilled to disk past the limit) and two
boundary gradients. On a GPU, each layer runs on the GPU while the boundary states stay on the host.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..archs import ArchAdapter
from ..options import CALIB_MEMORY, FISHER_LABELS
from .costs import CostTable, estimate_costs
from .hooks import experts_hooks
from .layer_pass import DEFAULT_BOUNDARY_LIMIT, LayerPass, Transformed, first_layer_input, progress_bar
from .layer_source import LayerSource, safetensors_files
from .stats import (DEFAULT_RAM_LIMIT, CalibStats, StatsRecorder, calibration_dtype, finish_stats, gradient_targets,
                    new_layer_stats, new_tensor_recorder, sequence_loss)
from .tensor_stats import TensorRecorder, tensor_hooks


def stream_stats(source: LayerSource | Transformed, adapter: ArchAdapter, tokens: torch.Tensor, *,
                 batch_size: int = 4, store_dtype: torch.dtype = torch.bfloat16, ram_limit: int = DEFAULT_RAM_LIMIT,
                 boundary_limit: int = DEFAULT_BOUNDARY_LIMIT, work_dir: Path | None = None,
                 datasets: list[str] | None = None, labels: str = FISHER_LABELS[0], seed: int = 0,
                 tensor_tokens: int = 0, progress: bool = False) -> CalibStats:
    """`collect_stats`'s statistics for the model of `source`, holding one layer's weights at a time."""
    if labels not in FISHER_LABELS:
        raise ValueError(f"labels must be one of {FISHER_LABELS}, not {labels!r}")
    model = source.model
    shape = adapter.moe_shape(model.config)
    seq_len = tokens.shape[1]
    lp = LayerPass(source, tokens, batch_size, boundary_limit, work_dir)
    tensors, trec = new_tensor_recorder(model, adapter, tokens, tensor_tokens, store_dtype, ram_limit, work_dir)
    steps = progress_bar(2 * lp.n_layers + 2 + (trec is not None), progress, "calibration (layer-streamed)")
    lp.embed()
    steps.update()
    lp.forward(steps.update)

    total = 0.0
    gen: torch.Generator | None = None

    def loss(s: int, logits: torch.Tensor) -> torch.Tensor:
        nonlocal gen, total
        if gen is None:
            gen = torch.Generator(device=logits.device).manual_seed(seed)
        batch = lp.batch(s).to(logits.device)
        value = sequence_loss(logits, gradient_targets(logits, batch, labels, gen))
        total += float(value.detach())
        return value

    def begin(s: int) -> None:
        if trec is not None:
            trec.begin(s * seq_len)

    with tensor_hooks(model, trec, embedding=False):  # logits, loss and its gradient at the last boundary
        grad = lp.head(loss, grad=True, begin=begin)
    steps.update()

    stats, spill_dir = new_layer_stats(shape, tokens.numel(), store_dtype, ram_limit, work_dir)
    recorder = StatsRecorder(adapter, stats)

    def begin_stats(s: int) -> None:
        recorder.offset = s * seq_len
        begin(s)

    with experts_hooks(model, adapter, recorder.hook), tensor_hooks(model, trec, embedding=False):
        assert grad is not None  # backward: recompute each layer from its input, record at MoE blocks
        grad = lp.backward(grad, input_grad=trec is not None, begin=begin_stats, done=steps.update)
    if trec is not None:
        assert grad is not None
        _embedding_gradients(source, trec, lp, grad)
        steps.update()
    steps.close()
    return finish_stats(stats, tokens, total / len(tokens), shape, datasets, spill_dir, tensors)


def _embedding_gradients(source: LayerSource | Transformed, trec: TensorRecorder, lp: LayerPass,
                         grad: torch.Tensor) -> None:
    """g at the input embedding's output: the embeddings run again with gradients up to the first layer's
    input (whatever the family does in between, e.g. Gemma's scaling), and `grad`, the gradient there, is
    pushed back through them batch by batch."""
    with source.loaded("embed"), tensor_hooks(source.model, trec, linear=False):
        for s in lp.starts:
            trec.begin(s * lp.seq_len)
            h0, _ = first_layer_input(source, lp.batch(s))
            h0.backward(lp.view(grad, s).to(h0.dtype))


def model_bytes(model_dir: Path, dtype: torch.dtype) -> int:
    """Bytes the checkpoint's weights take at `dtype` (from the shards' headers; nothing is read)."""
    from safetensors import safe_open
    size = torch.empty(0, dtype=dtype).element_size()
    n = 0
    for f in safetensors_files(model_dir):
        with safe_open(str(f), framework="pt") as h:
            n += sum(math.prod(h.get_slice(k).get_shape()) for k in h.keys())
    return n * size


def available_memory(device: torch.device) -> int:
    """Free bytes where the model would go: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def use_streaming(model_dir: Path, memory: str) -> bool:
    """`--calib-memory`: `stream`, `full`, or `auto`: stream a float safetensors checkpoint whose weights
    would take more than half the free memory (the whole-model pass also needs its activations, the
    statistics and the cost estimation's buffers; below that the whole model is faster: no
    recomputation, one read of each weight)."""
    if memory not in CALIB_MEMORY:
        raise ValueError(f"memory must be one of {CALIB_MEMORY}, not {memory!r}")
    if memory != "auto":
        return memory == "stream"
    from transformers import AutoConfig
    if not safetensors_files(model_dir) or getattr(AutoConfig.from_pretrained(model_dir), "quantization_config", None):
        return False
    dtype, device = _target(model_dir)
    return model_bytes(model_dir, dtype) > available_memory(device) // 2


def open_layer_source(model_dir: Path, adapter: ArchAdapter) -> LayerSource:
    """The checkpoint as a layer source on the calibration device and dtype (one GPU when there is one)."""
    return LayerSource(model_dir, adapter, *_target(model_dir))


def _target(model_dir: Path) -> tuple[torch.dtype, torch.device]:
    from transformers import AutoConfig
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return calibration_dtype(AutoConfig.from_pretrained(model_dir)), device


class LayerWindowAdapter:
    """`adapter`, with `moe_block` materialising the layer it is asked for from `source` and dropping the one
    held before: cost estimation walks the MoE layers in order, so it runs on the skeleton holding one
    layer's weights (`streamed_costs`). Call `source.release()` afterwards."""

    def __init__(self, adapter: ArchAdapter, source: LayerSource) -> None:
        self.adapter, self.source = adapter, source

    def moe_block(self, model: nn.Module, layer: int) -> nn.Module:
        self.source.hold(layer, window=1)
        return self.adapter.moe_block(model, layer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.adapter, name)


def streamed_costs(source: LayerSource, adapter: ArchAdapter, stats: CalibStats, imatrix: dict[str, np.ndarray],
                   **kwargs: Any) -> CostTable:
    """`estimate_costs` reading each layer's weights from `source` while its costs are computed, one layer
    held at a time (measured at Qwen3-30B-A3B shapes on CPU, 2 layers: 6.2 GiB of anonymous memory with one
    layer looked ahead)."""
    try:
        return estimate_costs(source.model, LayerWindowAdapter(adapter, source), stats, imatrix,  # type: ignore[arg-type]
                              ahead=False, **kwargs)
    finally:
        source.release()
