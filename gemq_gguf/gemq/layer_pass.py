"""The layer-streamed pass: the model of a `LayerSource` run over token batches one decoder layer at a
time. Calibration statistics (`streaming.stream_stats`), router tuning's teacher pass, training steps and
held-out scores (`router_stream.py`) all run on this one engine.

Forward: the embeddings turn every batch into the first layer's input; then layer by layer (its weights
read from the shards only while it runs) every batch's input becomes the next layer's input. The
layer-boundary hidden states of all batches are kept (in RAM, or in memmap files past `boundary_limit`
bytes). The head then gives each batch's logits and, when asked, the gradient of a loss at the last
boundary. Backward: from the top layer down, each layer's forward is recomputed from its saved input
with gradients on, and the boundary gradient (plus, when asked, the gradient of a loss term of that
layer alone) is pushed through it. Hooks on the model's modules fire in that recomputation exactly as
in a whole-model pass: same computations on the same values, layer by layer instead of model by model.

What each decoder layer is called with besides its hidden states (position ids, rotary cos/sin, the
causal mask, ...) is produced by the model's own forward: probes stand in for the decoder layers and
record their arguments, so no family's mask or rotary code is rewritten here. Masks and positions
depend only on the batch's shape (calibration rows are unpadded), so they are recorded once per shape.

Cost: the forward reads every layer once, the backward (recomputation) once more, plus one extra
forward per layer. Memory: one layer's weights, the embeddings or head while they run, the boundary
states ((layers + 1) · tokens · hidden values at the compute dtype) and two boundary gradients.
"""
from __future__ import annotations

import contextlib
import shutil
import weakref
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import nn

from ..errors import GemqError
from .buffers import host_buffer, spill_directory
from .layer_source import LayerSource, Part

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
        if any(a is not None for a in args):  # recorded once per batch shape: nothing may depend on the tokens
            raise GemqError("layer-streamed calibration cannot take this model: its decoder layers get per-token "
                            "inputs besides the hidden states (e.g. Gemma's per-layer inputs).",
                            "pass --calib-memory full (the whole model in memory).")
        self.calls[self.index] = {"input": hidden_states, "args": args, **kwargs}
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


def first_layer_input(source: Any, batch: torch.Tensor) -> tuple[torch.Tensor, dict[int, dict[str, Any]]]:
    """The embeddings' part of the model's forward for `batch` (embeddings loaded by the caller): the first
    decoder layer's input, and every layer's call arguments as the model's forward makes them."""
    calls: dict[int, dict[str, Any]] = {}
    with _probed(source.layers, lambda i: _Probe(i, calls, stop=i == len(source.layers) - 1)):
        with contextlib.suppress(_Stop):
            source.model(input_ids=batch.to(source.device), use_cache=False)
    return calls[0]["input"], calls


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class Transformed:
    """`source` whose decoder layers get `fn(index, layer)` each time they are materialised (e.g. router
    tuning's student: quantized experts, tuned routers); everything else is `source`'s."""

    def __init__(self, source: LayerSource, fn: Callable[[int, nn.Module], None]) -> None:
        self.source, self.fn = source, fn

    @contextlib.contextmanager
    def loaded(self, part: Part) -> Iterator[nn.Module]:
        with self.source.loaded(part) as module:
            if isinstance(part, int):
                self.fn(part, module)
            yield module

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)


class LayerPass:
    """`tokens` [N, L] in batches of `batch_size` rows through `source`'s model, one decoder layer at a time:
    `embed`, then `forward`, `head` and `backward` (each usable alone after the ones before it)."""

    def __init__(self, source: LayerSource | Transformed, tokens: torch.Tensor, batch_size: int,
                 boundary_limit: int = DEFAULT_BOUNDARY_LIMIT, work_dir: Path | None = None) -> None:
        self.source, self.tokens, self.batch_size = source, tokens, batch_size
        self.boundary_limit, self.work_dir = boundary_limit, work_dir
        n_seq, self.seq_len = tokens.shape
        self.n_layers = len(source.layers)
        self.starts = list(range(0, n_seq, batch_size))
        self._rows = {s: slice(s * self.seq_len, min(s + batch_size, n_seq) * self.seq_len) for s in self.starts}
        self.kwargs: dict[int, LayerKwargs] = {}
        self.h: list[torch.Tensor] = []  # [T, H] hidden states at the n_layers + 1 boundaries, all batches
        self._spill: Path | None = None

    def batch(self, s: int) -> torch.Tensor:
        """The token rows of the batch starting at row `s`."""
        return self.tokens[s:s + self.batch_size]

    def view(self, t: torch.Tensor, s: int) -> torch.Tensor:
        """Batch s's rows of a [T, H] host tensor as [B, L, H] on the device."""
        return t[self._rows[s]].reshape(-1, self.seq_len, t.shape[-1]).to(self.source.device)

    def _store(self, t: torch.Tensor, s: int, value: torch.Tensor) -> None:
        t[self._rows[s]] = value.detach().reshape(-1, t.shape[-1]).cpu()

    def _boundaries(self, hidden: int, dtype: torch.dtype) -> None:
        n_tok = len(self.tokens) * self.seq_len
        size = (self.n_layers + 1) * n_tok * hidden * torch.empty(0, dtype=dtype).element_size()
        if size > self.boundary_limit:
            self._spill = spill_directory(self.work_dir, "gemq-boundaries-")
            weakref.finalize(self, shutil.rmtree, self._spill, ignore_errors=True)
        self.h = [host_buffer((n_tok, hidden), dtype, self._spill / f"h{i}.bin" if self._spill else None)
                  for i in range(self.n_layers + 1)]

    def embed(self) -> None:
        """The first layer's input of every batch, and each layer's arguments per batch shape."""
        with self.source.loaded("embed"), torch.no_grad():
            for s in self.starts:
                batch = self.batch(s)
                h0, calls = first_layer_input(self.source, batch)
                if not self.h:
                    self._boundaries(h0.shape[-1], h0.dtype)
                self._store(self.h[0], s, h0)
                self.kwargs.setdefault(batch.shape[0], [{k: v for k, v in calls[i].items() if k != "input"}
                                                        for i in range(self.n_layers)])  # "args": Nones

    def run(self, i: int, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Decoder layer i on x [B, L, H], called as the model's forward calls it."""
        kw = dict(self.kwargs[x.shape[0]][i])
        return _layer_output(layer(x, *kw.pop("args"), **kw))

    def forward(self, done: Callable[[], None] = lambda: None) -> None:
        """Every layer over every batch, no gradients, filling the boundaries; `done()` after each layer."""
        for i in range(self.n_layers):
            with self.source.loaded(i) as layer, torch.no_grad():
                for s in self.starts:
                    self._store(self.h[i + 1], s, self.run(i, layer, self.view(self.h[i], s)))
            done()

    def head(self, loss: Callable[[int, torch.Tensor], torch.Tensor | None], grad: bool,
             begin: Callable[[int], None] | None = None) -> torch.Tensor | None:
        """Batch by batch (`begin(s)` first): the logits of the last boundary go to `loss(s, logits)`; with
        `grad`, its returned loss is differentiated and the gradient at the last boundary [T, H] returned."""
        model, layers, top = self.source.model, self.source.layers, self.h[self.n_layers]
        out = torch.zeros_like(top) if grad else None
        with self.source.loaded("head"), torch.enable_grad() if grad else torch.no_grad():
            for s in self.starts:
                if begin is not None:
                    begin(s)
                hl = self.view(top, s).requires_grad_(grad)
                calls: dict[int, dict[str, Any]] = {}
                with _probed(layers, lambda i: _Probe(i, calls, replace=hl if i == 0 else None)):
                    logits = model(inputs_embeds=hl.detach(), use_cache=False).logits
                value = loss(s, logits)
                if out is not None and value is not None:
                    value.backward()
                    self._store(out, s, hl.grad)
        return out

    def backward(self, grad: torch.Tensor, input_grad: bool, begin: Callable[[int], None] | None = None,
                 around: Callable[[int, nn.Module], ContextManager[Any]] | None = None,
                 extra: Callable[[int], torch.Tensor | None] | None = None,
                 done: Callable[[], None] = lambda: None) -> torch.Tensor | None:
        """From the top layer down, each layer recomputed batch by batch (`begin(s)` first) from its saved
        input with gradients on, and the boundary gradient `grad` [T, H] pushed through it, together with
        `extra(i)`, a scalar loss term of layer i alone computed in that recomputation (e.g. by hooks), when
        not None. `around(i, layer)` wraps each layer's batches (the layer still loaded on exit: gradients
        of its parameters can be read). Returns the gradient at the first layer's input when `input_grad`."""
        for i in reversed(range(self.n_layers)):
            below = torch.zeros_like(grad) if i > 0 or input_grad else None
            with self.source.loaded(i) as layer, around(i, layer) if around else contextlib.nullcontext():
                for s in self.starts:
                    if begin is not None:
                        begin(s)
                    x = self.view(self.h[i], s).requires_grad_(True)
                    out = self.run(i, layer, x)
                    roots, grads = [out], [self.view(grad, s).to(out.dtype)]
                    term = extra(i) if extra is not None else None
                    if term is not None:
                        roots.append(term)
                        grads.append(torch.ones_like(term))
                    torch.autograd.backward(roots, grads)
                    if below is not None:
                        self._store(below, s, x.grad)
            grad = below
            done()
        return grad


class _NoBar:
    def update(self) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, show: bool, desc: str) -> Any:
    """A tqdm bar of `total` steps (layers) when `show`, else one that shows nothing."""
    if not show:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step")
