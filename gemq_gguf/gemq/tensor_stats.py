"""Calibration records of the non-expert weights (attention, shared experts, dense MLPs, embeddings, LM
head): what their costs (gemq.tensor_costs) and their imatrix entries need.

For every linear y = W x outside the routed experts and routers, recorded during the same forward +
backward as the MoE blocks (`stats.collect_stats`, `streaming.stream_stats`):
- on a deterministic token subsample (whole sequences spread evenly over the calibration rows, which
  are grouped by source; about `tensor_tokens` tokens): the input x [K, in] and the gradient g [K, out]
  of the same loss at the output; modules that read the same input tensor (q/k/v, gate/up) share one
  x buffer;
- over all tokens: Σ x² per input column (llama.cpp's imatrix sums; counts = tokens).
For the input embedding: g at its output and the sampled token ids (llama.cpp collects no imatrix for a
row lookup). With tied embeddings and no output tensor in the GGUF, the LM head is recorded under
token_embd's name: that tensor's cost is the sum of both uses and its imatrix comes from the head.

Names: GGUF names from gguf-py's TensorNameMap for the architecture llama.cpp's converter writes (the
converter's model class), so keys are the float GGUF's names. A row fingerprint (W v for a fixed v) of the
weight the model ran lets the cost pass find the converter's row permutations (llama's q/k rope permute)
or tell that the GGUF tensor is another matrix (merged, split, rescaled).
"""
from __future__ import annotations

import contextlib
import math
import shutil
import weakref
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..ggml.names import tensor_category
from .buffers import host_buffer, spill_directory

EMBEDDING, LINEAR = "embedding", "linear"
#: categories of tensors with a cost (routed experts, routers and float-kept tensors have none here)
COSTED = ("embd", "output", "attn", "shexp", "ffn", "other")


@dataclass
class TensorUse:
    """One use of a non-expert weight: a linear y = W x, or the embedding lookup (rows by token id)."""

    name: str                 # GGUF tensor name
    module: str               # the Hugging Face module
    kind: str                 # LINEAR or EMBEDDING
    shape: tuple[int, int]    # (rows, row width) of W: (out, in), (vocab, hidden) for the embedding
    g: torch.Tensor           # [K, out] (embedding: [K, hidden]) dLoss/d output on the sampled tokens
    x: str = ""               # key of its input in TensorStats.inputs ("" for the embedding: TensorStats.ids)
    rows: torch.Tensor | None = None  # [out] float64 fingerprint W v of the weight the model ran


@dataclass
class TensorStats:
    """Every non-expert use's record; inputs shared between uses are stored once."""

    seqs: torch.Tensor                      # [S] int64 sampled calibration rows (sequences)
    seq_len: int
    n_tokens: int                           # all calibration tokens (the imatrix counts)
    uses: list[TensorUse]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # [K, in] store dtype
    sum2: dict[str, torch.Tensor] = field(default_factory=dict)    # [in] float64 Σ x² over all tokens
    ids: torch.Tensor | None = None         # [K] int64 token ids of the sample
    skipped: list[str] = field(default_factory=list)  # modules left out, with why
    work_dir: Path | None = None

    @property
    def sample_tokens(self) -> int:
        return len(self.seqs) * self.seq_len

    @property
    def scale(self) -> float:
        """Sample sums x scale = estimates of sums over all calibration tokens (the expert costs' units)."""
        return self.n_tokens / self.sample_tokens

    def imatrix_entries(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(sums [1, in], counts [1]) by GGUF name, llama.cpp's raw convention; a weight used twice sums both."""
        sums: dict[str, np.ndarray] = {}
        for u in self.uses:
            if u.kind == LINEAR and u.x in self.sum2:
                s = self.sum2[u.x].numpy()[None, :]
                sums[u.name] = sums[u.name] + s if u.name in sums else s.copy()
        return ({n: s.astype(np.float32) for n, s in sums.items()},
                {n: np.full(1, float(self.n_tokens), dtype=np.float32) for n in sums})


def fingerprint(w: torch.Tensor | np.ndarray) -> torch.Tensor:
    """W v in float64 for a fixed pseudo-random v: identifies each row of a matrix (for permutations)."""
    v = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if isinstance(w, torch.Tensor):
        return torch.cat([w[r:r + 8192].detach().to("cpu", torch.float64) @ v for r in range(0, w.shape[0], 8192)])
    return torch.cat([torch.from_numpy(np.asarray(w[r:r + 8192], dtype=np.float64).copy()) @ v
                      for r in range(0, w.shape[0], 8192)])


@cache
def _gguf_arch(hf_arch: str) -> Any:
    from ..runtime import import_converter
    try:
        return import_converter().get_model_class(hf_arch).model_arch
    except NotImplementedError:
        return None


def gguf_names(model: nn.Module, n_layers: int) -> dict[str, str]:
    """HF module name -> GGUF tensor name, for the modules the converter names (gguf-py's TensorNameMap); the
    first of the config's classes that the converter knows (a multimodal checkpoint's text model lists the
    checkpoint's class after its own)."""
    import gguf
    arch = next((a for a in (_gguf_arch(n) for n in getattr(model.config, "architectures", None) or []) if a), None)
    if arch is None:
        return {}
    tmap = gguf.get_tensor_name_map(arch, n_layers)
    out = {}
    for name, _ in model.named_modules():
        base = tmap.get_name(name) if name else None
        if base is not None:
            out[name] = base + ".weight"
    return out


def _weight_shape(m: nn.Module) -> tuple[int, int]:
    return tuple(m.weight.shape)  # type: ignore[return-value]


def new_tensor_stats(model: nn.Module, n_layers: int, tokens: torch.Tensor, tensor_tokens: int,
                     tied_head: bool, store_dtype: torch.dtype, ram_limit: int,
                     work_dir: Path | None) -> tuple[TensorStats, dict[int, TensorUse]]:
    """Zeroed records of every costed non-expert module, and module id -> its use; buffers go to memmap
    files under `work_dir` past `ram_limit` bytes. `tied_head`: the head is recorded as token_embd."""
    n_seq, seq_len = tokens.shape
    n_pick = min(n_seq, max(1, math.ceil(tensor_tokens / seq_len)))
    seqs = torch.tensor([i * n_seq // n_pick for i in range(n_pick)], dtype=torch.int64)
    k = n_pick * seq_len
    names = gguf_names(model, n_layers)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    found: list[tuple[str, nn.Module, str, str]] = []
    skipped = []
    for mname, m in model.named_modules():
        if m is not embed and not isinstance(m, nn.Linear):
            continue
        name = names.get(mname)
        if m is head and tied_head:
            name = names.get(next(n for n, x in model.named_modules() if x is embed))
        if name is None:
            skipped.append(f"{mname} (no GGUF name)")
            continue
        if tensor_category(name, 2) in COSTED:
            found.append((mname, m, name, EMBEDDING if m is embed else LINEAR))
    # values per sampled token: g and x of a linear (an upper bound: shared inputs are stored once), g of the lookup
    per_token = sum(sum(_weight_shape(m)) if kind == LINEAR else _weight_shape(m)[1] for _, m, _, kind in found)
    size = k * per_token * torch.empty(0, dtype=store_dtype).element_size()
    spill_dir = spill_directory(work_dir, "gemq-tensors-") if size > ram_limit else None
    uses, by_module = [], {}
    for i, (mname, m, name, kind) in enumerate(found):
        rows, width = _weight_shape(m)
        g = host_buffer((k, rows if kind == LINEAR else width), store_dtype, spill_dir / f"g{i}.bin" if spill_dir else None)
        uses.append(TensorUse(name=name, module=mname, kind=kind, shape=(rows, width), g=g))
        by_module[id(m)] = uses[-1]
    stats = TensorStats(seqs=seqs, seq_len=seq_len, n_tokens=n_seq * seq_len, uses=uses,
                        ids=tokens[seqs].reshape(-1).clone(), skipped=skipped, work_dir=spill_dir)
    if spill_dir is not None:
        weakref.finalize(stats, shutil.rmtree, spill_dir, ignore_errors=True)
    return stats, by_module


class TensorRecorder:
    """Forward hooks on the costed modules; `begin(offset)` before each batch's forward locates its tokens."""

    def __init__(self, stats: TensorStats, by_module: dict[int, TensorUse], store_dtype: torch.dtype) -> None:
        self.stats, self.by_module, self.store_dtype = stats, by_module, store_dtype
        slot = torch.full((stats.n_tokens,), -1, dtype=torch.int64)
        for j, s in enumerate(stats.seqs.tolist()):
            slot[s * stats.seq_len:(s + 1) * stats.seq_len] = torch.arange(j * stats.seq_len, (j + 1) * stats.seq_len)
        self.slot = slot
        self.offset = 0
        self._seen: dict[int, tuple[weakref.ref, str]] = {}  # id(input) -> (input, key): inputs read this batch
        self._written: set[str] = set()
        self._called: set[int] = set()

    def begin(self, offset: int) -> None:
        self.offset = offset
        self._seen.clear()
        self._written.clear()
        self._called.clear()

    def _rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of this batch, slots in the sample buffers) of the batch's sampled tokens."""
        slots = self.slot[self.offset:self.offset + n]
        local = (slots >= 0).nonzero().squeeze(1)
        return local, slots[local]

    def _input_key(self, use: TensorUse, x: torch.Tensor) -> str:
        seen = self._seen.get(id(x))
        if not use.x:  # first call: share the buffer of a module that read this very tensor
            use.x = seen[1] if seen is not None and seen[0]() is x else use.module
        self._seen[id(x)] = (weakref.ref(x), use.x)
        return use.x

    def _new_input(self, key: str, width: int) -> None:
        d = self.stats.work_dir
        path = d / f"x{len(self.stats.inputs)}.bin" if d is not None else None
        self.stats.inputs[key] = host_buffer((self.stats.sample_tokens, width), self.store_dtype, path)
        self.stats.sum2[key] = torch.zeros(width, dtype=torch.float64)

    def linear_hook(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        use = self.by_module.get(id(module))
        if use is None:
            return
        if id(module) in self._called:  # one x and g per token and module: a weight used twice is left out
            self.stats.skipped.append(f"{use.module} ({use.name}: runs more than once per forward)")
            self.stats.uses.remove(use)
            del self.by_module[id(module)]
            return
        self._called.add(id(module))
        if use.rows is None:
            use.rows = fingerprint(module.weight)
        x = args[0]
        key = self._input_key(use, x)
        flat = x.detach().reshape(-1, x.shape[-1])
        local, slots = self._rows(flat.shape[0])
        if key not in self._written:
            self._written.add(key)
            if key not in self.stats.inputs:
                self._new_input(key, flat.shape[1])
            with torch.no_grad():
                self.stats.sum2[key] += (flat.double() ** 2).sum(0).cpu()
                if len(local):
                    self.stats.inputs[key][slots] = flat[local.to(flat.device)].to(self.store_dtype).cpu()
        if out.requires_grad and len(local):
            out.register_hook(self._grad_hook(use, local, slots))

    def embedding_hook(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        use = self.by_module[id(module)]
        if use.rows is None:
            use.rows = fingerprint(module.weight)
        out.requires_grad_(True)
        local, slots = self._rows(out.shape[0] * out.shape[1] if out.dim() == 3 else out.shape[0])
        if len(local):
            out.register_hook(self._grad_hook(use, local, slots))

    @staticmethod
    def _grad_hook(use: TensorUse, local: torch.Tensor, slots: torch.Tensor) -> Any:
        def hook(grad: torch.Tensor) -> None:
            g = grad.detach().reshape(-1, grad.shape[-1])
            use.g[slots] = g[local.to(g.device)].to(use.g.dtype).cpu()
        return hook


@contextlib.contextmanager
def tensor_hooks(model: nn.Module, rec: TensorRecorder | None, linear: bool = True,
                 embedding: bool = True) -> Iterator[None]:
    """The recorder's hooks on the model's costed linears and/or its input embedding (none for None)."""
    handles = []
    if rec is not None:
        embed = model.get_input_embeddings()
        for m in model.modules():
            use = rec.by_module.get(id(m))
            if use is None:
                continue
            if m is embed and use.kind == EMBEDDING:
                if embedding:
                    handles.append(m.register_forward_hook(rec.embedding_hook))
            elif linear:
                handles.append(m.register_forward_hook(rec.linear_hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def tied_head(model: nn.Module, needs_output_tensor: bool) -> bool:
    """The GGUF will hold no output tensor: the head is the embedding and llama.cpp reuses token_embd."""
    return bool(getattr(model.config, "tie_word_embeddings", False)) and not needs_output_tensor
