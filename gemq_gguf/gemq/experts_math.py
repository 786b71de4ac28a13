"""An expert's function, and how much it changes when some of its matrices are replaced by quantized ones
(pure tensor math; GEMQ's costs and the imatrix are built on it).

An expert computes E(x) = finish(glu(x W_gate^T + b_gate, x W_up^T + b_up) W_down^T + b_down): `glu` is the
family's own (SwiGLU, gpt-oss's clamped SwiGLU, or act(up) without a gate), biases and the post-expert
norm only where the family has them (`archs.ExpertsView`). Quantization changes only the matrices.

Sampled costs (`--cost-rows`) replace only some rows of each matrix (`RowPatch`): a down row is one output
coordinate, a gate/up row one intermediate channel, and the GLU acts channel by channel (every family's:
SwiGLU, clamped SwiGLU, act(up)), so `patched_delta` computes the change on those rows and channels only,
at the sample's share of the FLOPs, instead of on whole matrices with most rows unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from ..archs import ExpertsView

Glu = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExpertFn:
    """What an expert computes besides its matrices, on the device and dtype of the cost arithmetic."""

    glu: Glu
    act: Callable[[torch.Tensor], torch.Tensor] | None  # set when glu(g, u) = act(g) * u (exact delta below)
    bias: dict[str, torch.Tensor]                       # per projection; empty for most families
    finish: Callable[[torch.Tensor], torch.Tensor] | None  # post-expert norm (non-linear), or None

    def pre(self, x: torch.Tensor, w: torch.Tensor, proj: str) -> torch.Tensor:
        y = x @ w.T
        return y + self.bias[proj] if proj in self.bias else y


def expert_fn(view: ExpertsView, e: int, device: torch.device | str, dtype: torch.dtype) -> ExpertFn:
    bias = {p: b.detach().to(device, dtype) for p in view.projs if (b := view.bias(p, e)) is not None}
    norm = view.module.post_expert_norm if getattr(view.module, "has_post_expert_norm", False) else None
    return ExpertFn(glu=view.glu, act=view.standard_act(), bias=bias, finish=norm)


@dataclass(frozen=True)
class ExpertPass:
    """An expert's full-precision forward on its routed tokens, reused by every quantized variant."""

    x: torch.Tensor
    w: dict[str, torch.Tensor]
    fn: ExpertFn
    pre: dict[str, torch.Tensor]  # x W^T (+ b) of the projections before down
    a: torch.Tensor | None        # act(pre gate) when glu = act(gate) * up
    h: torch.Tensor               # glu output, the down projection's input

    @cached_property
    def down_t(self) -> torch.Tensor:
        """W_down^T, contiguous: sampled channels C of h reach the outputs through its rows C."""
        return self.w["down"].T.contiguous()


def expert_pass(x: torch.Tensor, w: dict[str, torch.Tensor], fn: ExpertFn) -> ExpertPass:
    pre = {p: fn.pre(x, w[p], p) for p in w if p != "down"}
    if fn.act is not None:
        a = fn.act(pre["gate"])
        return ExpertPass(x, w, fn, pre, a, a * pre["up"])
    return ExpertPass(x, w, fn, pre, None, fn.glu(pre.get("gate"), pre["up"]))


def expert_hidden(view: ExpertsView, x: torch.Tensor, w: dict[str, torch.Tensor], e: int) -> torch.Tensor:
    """The down projection's input for tokens x (what llama.cpp's imatrix records for down)."""
    return expert_pass(x, {p: v for p, v in w.items() if p != "down"}, expert_fn(view, e, x.device, x.dtype)).h


def _hidden_delta(base: ExpertPass, wq: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """h − h_q, or None when only down is replaced."""
    x, w, fn = base.x, base.w, base.fn
    if not any(p != "down" for p in wq):
        return None
    if fn.act is not None:  # glu = act(gate) * up
        a_q = fn.act(fn.pre(x, wq["gate"], "gate")) if "gate" in wq else base.a
        dh = (base.a - a_q) * base.pre["up"] if "gate" in wq else torch.zeros_like(base.h)
        return dh + a_q * (x @ (w["up"] - wq["up"]).T) if "up" in wq else dh
    pre_q = {p: base.pre[p] - x @ (w[p] - wq[p]).T if p in wq else base.pre[p] for p in base.pre}
    return base.h - fn.glu(pre_q.get("gate"), pre_q["up"])


def expert_delta(base: ExpertPass, wq: dict[str, torch.Tensor]) -> torch.Tensor:
    """E(x) − E_q(x) with the projections in `wq` replaced (the others stay exact).

    Written with weight differences (h − h_q = (a − a_q)·up + a_q·x ΔW_up^T, ...), so the small delta
    keeps its precision in float32 instead of being a difference of two large outputs; where the GLU is
    not act(gate)·up, h − h_q is a difference of two GLU outputs whose inputs differ by exactly x ΔW^T.
    """
    w, fn = base.w, base.fn
    dh = _hidden_delta(base, wq)
    w_down_q = wq.get("down", w["down"])
    if fn.finish is not None:  # a norm after down: the difference of the two outputs
        h_q = base.h if dh is None else base.h - dh
        return fn.finish(fn.pre(base.h, w["down"], "down")) - fn.finish(fn.pre(h_q, w_down_q, "down"))
    delta = base.h @ (w["down"] - wq["down"]).T if "down" in wq else None
    if dh is not None:
        d = dh @ w_down_q.T
        delta = d if delta is None else delta + d
    return delta


@dataclass(frozen=True)
class RowPatch:
    """Rows `rows` (sorted, distinct) of a projection's matrix replaced by `w` ([len(rows), n_in])."""

    rows: torch.Tensor
    w: torch.Tensor


def patched_delta(base: ExpertPass, patches: dict[str, RowPatch]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(delta, out): E(x) − E_q(x) with only the patched rows replaced, delta[:, k] being output coordinate
    out[k] (out None: every coordinate). The same value as `expert_delta` with the patched matrices, computed
    on the changed rows only: gate/up's change of h on the union C of their patched channels reaches the
    outputs through down's columns C; down's patched output rows S add (h − Δh) ΔW_S^T (down's own change,
    seen by the quantized h). Needs no post-expert norm (a norm mixes every coordinate: use `expert_delta`)."""
    if base.fn.finish is not None:
        raise ValueError("patched_delta: a post-expert norm needs the whole output (use expert_delta)")
    x, w, fn = base.x, base.w, base.fn
    down = patches.get("down")
    inner = {p: v for p, v in patches.items() if p != "down"}
    if not inner:
        if down is None:
            raise ValueError("patched_delta: no patches")
        return base.h @ (w["down"][down.rows] - down.w).T, down.rows
    chans = next(iter(inner.values())).rows
    if any(not torch.equal(v.rows, chans) for v in inner.values()):
        chans = torch.unique(torch.cat([v.rows for v in inner.values()]))  # sorted
    dpre = {}
    for p, v in inner.items():  # x ΔW^T on p's patched rows, as columns of C
        d = x @ (w[p][v.rows] - v.w).T
        if len(v.rows) != len(chans):
            d = torch.zeros(x.shape[0], len(chans), dtype=x.dtype, device=x.device).index_copy_(
                1, torch.searchsorted(chans, v.rows), d)
        dpre[p] = d
    pre = {p: base.pre[p][:, chans] for p in base.pre}
    if fn.act is not None:  # glu = act(gate) * up, as in _hidden_delta
        a = base.a[:, chans]
        a_q = fn.act(pre["gate"] - dpre["gate"]) if "gate" in dpre else a
        dh = (a - a_q) * pre["up"] if "gate" in dpre else torch.zeros_like(a)
        dh = dh + a_q * dpre["up"] if "up" in dpre else dh
    else:
        pre_q = {p: pre[p] - dpre[p] if p in dpre else pre[p] for p in pre}
        dh = base.h[:, chans] - fn.glu(pre_q.get("gate"), pre_q["up"])
    delta = dh @ base.down_t[chans]
    if down is not None:
        h_q = base.h.index_add(1, chans, dh, alpha=-1)
        delta[:, down.rows] += h_q @ (w["down"][down.rows] - down.w).T
    return delta, None
