"""The routed experts of one MoE block, read through transformers 5's shared experts interface.

transformers 5 stores the experts of most MoE families in one module decorated with
`use_experts_implementation`: stacked `gate_up_proj` (or `up_proj` without a gate) and `down_proj`,
optional biases, a layout flag pair (`is_transposed`, `is_concatenated`: gate/up halves or interleaved
columns), `_apply_gate` (the family's GLU, clamped SwiGLU included) and an optional post-expert norm;
and every block calls it as `experts(hidden_states, top_k_index, top_k_weights)`. So one view serves
every such family: routing is read from that call exactly as the model computes it (whatever its
scoring, bias correction, group-limited top-k or scaling), and an expert's function is the module's own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..ggml.names import PROJS


def is_experts_module(m: nn.Module) -> bool:
    """A module built with transformers' experts interface (the decorator sets these attributes)."""
    return hasattr(m, "has_gate") and hasattr(m, "is_transposed") and isinstance(getattr(m, "down_proj", None),
                                                                                   nn.Parameter)


@dataclass(frozen=True)
class ExpertsCall:
    """One call of the experts module: its input [T, H], the chosen experts [T, k] and their weights [T, k]."""

    x: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def from_hook(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ExpertsCall:
        values = list(args) + list(kwargs.values())
        return cls(values[0], values[1], values[2])


@dataclass(frozen=True)
class Layout:
    """How an experts module stores its matrices (the interface's flags; given by hand for a family
    whose experts module does not use the interface)."""

    has_gate: bool
    is_transposed: bool      # [E, in, out] instead of [E, out, in]
    is_concatenated: bool    # gate then up halves, instead of interleaved columns
    has_bias: bool = False

    @classmethod
    def of(cls, m: nn.Module) -> Layout:
        return cls(m.has_gate, m.is_transposed, m.is_concatenated, m.has_bias)


class ExpertsView:
    """[out, in] matrices of one expert, keyed like the GGUF tensors (gate, up, down), and its function.

    `input_weighted`: the routing weight scales the expert's input, E(w x), not its output w E(x)
    (Llama 4); calibration and costs then feed each expert w x and weigh its output by 1."""

    def __init__(self, module: nn.Module, layout: Layout | None = None, input_weighted: bool = False) -> None:
        if layout is None and not is_experts_module(module):
            raise TypeError(f"{type(module).__name__} does not use transformers' experts interface")
        self.module, self.input_weighted = module, input_weighted
        self.layout = lay = layout or Layout.of(module)
        self.projs: tuple[str, ...] = PROJS if lay.has_gate else ("up", "down")
        first = module.gate_up_proj if lay.has_gate else module.up_proj
        self.n_experts = int(first.shape[0])
        down = module.down_proj.shape[1:]
        self.hidden, self.ffn = (int(down[1]), int(down[0])) if lay.is_transposed else (int(down[0]), int(down[1]))

    def _slices(self, proj: str) -> tuple[nn.Parameter, Any]:
        """The parameter holding `proj` and the slice of its output axis (the fused gate/up axis)."""
        m, lay = self.module, self.layout
        if proj == "down":
            return m.down_proj, slice(None)
        if not lay.has_gate:
            return m.up_proj, slice(None)
        i = self.ffn
        if lay.is_concatenated:
            return m.gate_up_proj, slice(0, i) if proj == "gate" else slice(i, 2 * i)
        return m.gate_up_proj, slice(0, None, 2) if proj == "gate" else slice(1, None, 2)

    def weight(self, proj: str, e: int) -> torch.Tensor:
        """Expert e's `proj` matrix as [out, in] (a view of the parameter)."""
        p, sl = self._slices(proj)
        return p[e][:, sl].T if self.layout.is_transposed else p[e][sl]

    def weights(self, e: int) -> dict[str, torch.Tensor]:
        return {p: self.weight(p, e) for p in self.projs}

    def set_weights(self, e: int, w: dict[str, torch.Tensor]) -> None:
        """Replace expert e's matrices in place (costs and router tuning run against quantized experts)."""
        with torch.no_grad():
            for proj, value in w.items():
                self.weight(proj, e).copy_(value)

    def bias(self, proj: str, e: int) -> torch.Tensor | None:
        if not self.layout.has_bias:
            return None
        if proj == "down":
            return self.module.down_proj_bias[e]
        p, sl = self._slices(proj)
        b = self.module.gate_up_proj_bias if self.layout.has_gate else self.module.up_proj_bias
        return b[e][sl]

    def glu(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        """The activation between the first projections and down: the family's own `_apply_gate` (SwiGLU,
        clamped SwiGLU, ...) fed in its own layout, or `act_fn(up)` for experts without a gate."""
        m = self.module
        if not self.layout.has_gate:
            return m.act_fn(up)
        if not hasattr(m, "_apply_gate"):  # a module outside the interface: act(gate) * up
            return m.act_fn(gate) * up
        fused = torch.cat([gate, up], -1) if self.layout.is_concatenated else torch.stack([gate, up], -1).flatten(-2)
        return m._apply_gate(fused)

    def standard_act(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """`act_fn` when the GLU is transformers' default act(gate) * up (then costs use an exact
        decomposition of the change), else None."""
        if not self.layout.has_gate:
            return None
        from transformers.integrations import moe
        default = getattr(moe, "_default_apply_gate", None)
        apply = getattr(type(self.module), "_apply_gate", None)
        return self.module.act_fn if apply is None or apply is default else None
