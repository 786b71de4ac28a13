"""Layer-streamed calibration statistics: the whole-model pass of `stats.collect_stats`, in memory
bounded by one decoder layer's weights.

Forward: the embeddings turn every batch into the first layer's input; then layer by layer (its
weights read from the shards only while it runs, `layer_source.py`) every batch's input becomes the
next layer's input. The layer-boundary hidden states of all batches are kept (in RAM, or in memmap
files past `boundary_limit` bytes). The head then gives each batch's logits, the loss (the same
`sequence_loss` against the same targets: `--fisher sampled` draws in the same order from the same
seeded generator) and its gradient at the last boundary. Backward: from the top layer down, each
layer's forward is recomputed from its saved input with gradients on, and the boundary gradient is
pushed through it. The MoE hooks of `stats.StatsRecorder` fire during that recomputation, so x, the
routing, the imatrix sums and g at every MoE block's output are exactly those of the whole-model pass
(same computations on the same values, layer by layer instead of model by model). The non-expert
records (tensor_stats.py) come from the same recomputation (the LM head's from the head pass); the
gradient at the embedding's output from one more pass through the embeddings, fed the gradient at the
first layer's input.

What each decoder layer is called with besides its hidden states (position ids, rotary cos/sin, the
causal mask, ...) is produced by the model's own forward: probes stand in for the decoder layers and
record their arguments, so no family's mask or rotary code is rewritten here. Masks and positions
depend only on the batch's shape (calibration rows are unpadded), so they are recorded once per shape.

Cost: one extra forward per layer (the recomputation) and reading each layer's weights twice.
Memory: one layer's weights, the embeddings or head while they run, the boundary states
((layers + 1) · tokens · hidden values at the compute dtype, spilled to disk past the limit) and two
boundary gradients. On a GPU, each layer runs on the GPU while the boundary states stay on the host.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..archs import ArchAdapter
from ..options import CALIB_MEMORY, FISHER_LABELS
from .hooks import experts_hooks
from .layer_source import LayerSource, safetensors_files
from .buffers import host_buffer, spill_directory
from .stats import (DEFAULT_RAM_LIMIT, CalibStats, StatsRecorder, calibration_dtype, finish_stats, gradient_targets,
                    new_layer_stats, new_tensor_recorder, sequence_loss)
from .tensor_stats import TensorRecorder, tensor_hooks

#: bytes of boundary hidden states kept in RAM before they go to memmap files
DEFAULT_BOUNDARY_LIMIT = 2 * 2**30

LayerKwargs = list[dict[str, Any]]  # per decoder layer: what the model's forward passes besides hidden states


class _Stop(Exception):
    """Raised by the last probe: the model's forward has nothing more to give."""


class _Probe(nn.Module):
    """Stands in for decoder layer `index`: records its keyword arguments and returns `replace` (when set)
    or its input unchanged."""

    def __init__(self, index: int, calls: dict[int, dict[str, Any]], replace: torch.Tensor | None = None,
                 stop: bool = False) -> None:
        super().__init__()
        self.index, self.calls, self.replace, self.stop = index, calls, replace, stop

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise TypeError("decoder layers called with positional arguments beyond the hidden states")
        self.calls[self.index] = {"input": hidden_states, **kwargs}
        if self.stop:
            raise _Stop
        return hidden_states if self.replace is None else self.replace


@contextlib.contextmanager
def _probed(layers: nn.ModuleList, make: Callable[[int], _Probe]) -> Iterator[None]:
    """The decoder layers replaced by probes for the duration of the block."""
    saved = list(layers)
    for i in range(len(saved)):
        layers[i] = make(i)
    try:
        yield
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class _Boundaries:
    """Hidden states at the n_layers + 1 layer boundaries for all tokens [T, H], in RAM or memmap files."""

    def __init__(self, n: int, n_tok: int, hidden: int, dtype: torch.dtype, limit: int,
                 work_dir: Path | None) -> None:
        size = (n + 1) * n_tok * hidden * torch.empty(0, dtype=dtype).element_size()
        self.dir = spill_directory(work_dir, "gemq-boundaries-") if size > limit else None
        self.h = [host_buffer((n_tok, hidden), dtype, self.dir / f"h{i}.bin" if self.dir else None) for i in range(n + 1)]
        if self.dir is not None:
            weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)


def stream_stats(source: LayerSource, adapter: ArchAdapter, tokens: torch.Tensor, *, batch_size: int = 4,
                 store_dtype: torch.dtype = torch.bfloat16, ram_limit: int = DEFAULT_RAM_LIMIT,
                 boundary_limit: int = DEFAULT_BOUNDARY_LIMIT, work_dir: Path | None = None,
                 datasets: list[str] | None = None, labels: str = FISHER_LABELS[0], seed: int = 0,
                 tensor_tokens: int = 0, progress: bool = False) -> CalibStats:
    """`collect_stats`'s statistics for the model of `source`, holding one layer's weights at a time."""
    if labels not in FISHER_LABELS:
        raise ValueError(f"labels must be one of {FISHER_LABELS}, not {labels!r}")
    model, layers, device = source.model, source.layers, source.device
    shape = adapter.moe_shape(model.config)
    n_seq, seq_len = tokens.shape
    n_tok, n_layers = n_seq * seq_len, len(layers)
    starts = list(range(0, n_seq, batch_size))
    rows = {s: slice(s * seq_len, min(s + batch_size, n_seq) * seq_len) for s in starts}

    def batch_view(t: torch.Tensor, s: int) -> torch.Tensor:  # [T, H] rows of batch s -> [B, L, H] on device
        return t[rows[s]].reshape(-1, seq_len, t.shape[-1]).to(device)

    tensors, trec = new_tensor_recorder(model, adapter, tokens, tensor_tokens, store_dtype, ram_limit, work_dir)
    steps = _progress(2 * n_layers + 2 + (trec is not None), progress)
    # embeddings: the first layer's input of every batch, and each layer's arguments per batch shape
    kwargs: dict[int, LayerKwargs] = {}
    with source.loaded("embed"):
        h0 = None
        for s in starts:
            batch = tokens[s:s + batch_size].to(device)
            calls: dict[int, dict[str, Any]] = {}
            with _probed(layers, lambda i: _Probe(i, calls, stop=i == n_layers - 1)):
                with contextlib.suppress(_Stop), torch.no_grad():
                    model(input_ids=batch, use_cache=False)
            if h0 is None:
                bounds = _Boundaries(n_layers, n_tok, calls[0]["input"].shape[-1], calls[0]["input"].dtype,
                                     boundary_limit, work_dir)
                h0 = bounds.h[0]
            h0[rows[s]] = calls[0]["input"].reshape(-1, h0.shape[-1]).cpu()
            kwargs.setdefault(batch.shape[0], [{k: v for k, v in calls[i].items() if k != "input"}
                                               for i in range(n_layers)])
    steps.update()

    def run(i: int, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _layer_output(layer(x, **kwargs[x.shape[0]][i]))

    for i in range(n_layers):  # forward, layer by layer
        with source.loaded(i) as layer, torch.no_grad():
            for s in starts:
                bounds.h[i + 1][rows[s]] = run(i, layer, batch_view(bounds.h[i], s)).reshape(
                    -1, bounds.h[i].shape[-1]).cpu()
        steps.update()

    grad = torch.zeros_like(bounds.h[n_layers], device="cpu")
    total = 0.0
    gen: torch.Generator | None = None
    with source.loaded("head"), tensor_hooks(model, trec, embedding=False):  # logits, loss and its gradient at
        for s in starts:                                                      # the last boundary, batch by batch
            if trec is not None:
                trec.begin(s * seq_len)
            hl = batch_view(bounds.h[n_layers], s).requires_grad_(True)
            calls = {}
            with _probed(layers, lambda i: _Probe(i, calls, replace=hl if i == 0 else None)):
                logits = model(inputs_embeds=hl.detach(), use_cache=False).logits
            if gen is None:
                gen = torch.Generator(device=logits.device).manual_seed(seed)
            batch = tokens[s:s + batch_size].to(logits.device)
            loss = sequence_loss(logits, gradient_targets(logits, batch, labels, gen))
            loss.backward()
            grad[rows[s]] = hl.grad.reshape(-1, hl.shape[-1]).cpu()
            total += float(loss.detach())
    steps.update()

    stats, spill_dir = new_layer_stats(shape, n_tok, store_dtype, ram_limit, work_dir)
    recorder = StatsRecorder(adapter, stats)
    with experts_hooks(model, adapter, recorder.hook), tensor_hooks(model, trec, embedding=False):
        for i in reversed(range(n_layers)):  # backward: recompute each layer from its input, record at MoE blocks
            below = torch.zeros_like(grad) if i > 0 or trec is not None else None
            with source.loaded(i) as layer:
                for s in starts:
                    recorder.offset = s * seq_len
                    if trec is not None:
                        trec.begin(s * seq_len)
                    x = batch_view(bounds.h[i], s).requires_grad_(True)
                    out = run(i, layer, x)
                    out.backward(batch_view(grad, s).to(out.dtype))
                    if below is not None:
                        below[rows[s]] = x.grad.reshape(-1, x.shape[-1]).cpu()
            grad = below
            steps.update()
    if trec is not None:
        _embedding_gradients(source, trec, tokens, starts, batch_size, lambda s: batch_view(grad, s))
        steps.update()
    steps.close()
    return finish_stats(stats, tokens, total / n_seq, shape, datasets, spill_dir, tensors)


def _embedding_gradients(source: LayerSource, trec: TensorRecorder, tokens: torch.Tensor, starts: list[int],
                         batch_size: int, grad: Callable[[int], torch.Tensor]) -> None:
    """g at the input embedding's output: the embeddings run again with gradients up to the first layer's
    input (whatever the family does in between, e.g. Gemma's scaling), and `grad(s)`, batch s's gradient
    there, is pushed back through them."""
    model, layers = source.model, source.layers
    with source.loaded("embed"), tensor_hooks(model, trec, linear=False):
        for s in starts:
            trec.begin(s * tokens.shape[1])
            calls: dict[int, dict[str, Any]] = {}
            with _probed(layers, lambda i: _Probe(i, calls, stop=True)), contextlib.suppress(_Stop):
                model(input_ids=tokens[s:s + batch_size].to(source.device), use_cache=False)
            h0 = calls[0]["input"]
            h0.backward(grad(s).to(h0.dtype))


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
    """`adapter`, with `moe_block` materialising the layer it is asked for from `source` (two layers held
    at most): cost estimation walks the MoE layers in order, one ahead, so it runs on the skeleton
    holding two layers' weights. Call `source.release()` afterwards."""

    def __init__(self, adapter: ArchAdapter, source: LayerSource) -> None:
        self.adapter, self.source = adapter, source

    def moe_block(self, model: nn.Module, layer: int) -> nn.Module:
        self.source.hold(layer)
        return self.adapter.moe_block(model, layer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.adapter, name)


class _NoBar:
    def update(self) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, show: bool) -> Any:
    if not show:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc="calibration (layer-streamed)", unit="step")
