"""Types for the tensors that are not routed experts: attention, shared experts, embeddings, output.

GEMQ allocates bits among routed experts only (they are >90% of an MoE's weights). Every other tensor
gets a fixed type by category, like llama-quantize's recipes; users override categories or single
tensors with `--tensor-type PATTERN=TYPE` (a category name or a regular expression on GGUF names).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from .errors import GemqError
from .ggml.names import CATEGORIES, tensor_category
from .ggml.types import canonical

# Default types by category: Q6_K, but routers stay F32 (llama-quantize never quantizes them; they carry
# the fine-tuned weights), as do norms and other 1-D tensors.
DEFAULTS: dict[str, str] = {c: "F32" if c == "router" else "Q6_K" for c in CATEGORIES}


@dataclass
class TensorPolicy:
    """Category defaults plus user overrides; first matching override wins."""

    defaults: dict[str, str] = field(default_factory=lambda: dict(DEFAULTS))
    overrides: list[tuple[re.Pattern[str], str]] = field(default_factory=list)

    @classmethod
    def from_args(cls, specs: Sequence[str] | None, non_expert: str | None = None) -> "TensorPolicy":
        """Build from `--non-expert TYPE` (all categories but routers) and `--tensor-type PATTERN=TYPE`."""
        policy = cls()
        if non_expert:
            policy.defaults.update({k: canonical(non_expert) for k in policy.defaults if k != "router"})
        for spec in specs or []:
            if "=" not in spec:
                raise GemqError(f"--tensor-type '{spec}' is not PATTERN=TYPE.", "write e.g. attn=Q8_0 or 'blk\\.0\\..*'=Q8_0.")
            pattern, type_name = spec.rsplit("=", 1)
            type_name = canonical(type_name)
            if pattern in policy.defaults:
                policy.defaults[pattern] = type_name
            elif pattern == "expert":
                raise GemqError("routed experts are typed by the allocation, not by --tensor-type.",
                                "use --uniform TYPE, --plan FILE or --budget.")
            else:
                try:
                    policy.overrides.append((re.compile(pattern), type_name))
                except re.error as e:
                    raise GemqError(f"--tensor-type pattern '{pattern}' is not a valid regular expression ({e}).",
                                    f"use a category ({', '.join(DEFAULTS)}) or a valid regex.") from None
        return policy

    def type_for(self, name: str, n_dims: int) -> str:
        """The requested type of a non-expert tensor (before any row-width fallback)."""
        cat = tensor_category(name, n_dims)
        if cat == "f32":
            return "F32"
        for pattern, type_name in self.overrides:
            if pattern.search(name):
                return type_name
        return self.defaults[cat]
