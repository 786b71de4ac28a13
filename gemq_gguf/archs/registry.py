"""The one registry of architecture adapters, keyed by Hugging Face class name (`architectures` in config.json)."""
from __future__ import annotations

from ..errors import GemqError
from .base import ArchAdapter

_REGISTRY: dict[str, ArchAdapter] = {}
_REFUSED: dict[str, str] = {}  # MoE classes we know and cannot convert faithfully: why not


def register(cls: type[ArchAdapter]) -> type[ArchAdapter]:
    """Class decorator: make an adapter available for each of its Hugging Face class names."""
    for hf in cls.hf_classes:
        _REGISTRY[hf] = cls()
    return cls


def refuse(hf_class: str, why: str) -> None:
    """Record a known MoE class that is refused, and why (said in the error instead of a bare "unsupported")."""
    if hf_class in _REGISTRY:
        raise ValueError(f"{hf_class} is both registered and refused")
    _REFUSED[hf_class] = why


def supported() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(architectures: list[str] | None) -> ArchAdapter:
    """The adapter for a config's `architectures` list, or a clear error listing what is supported."""
    for a in architectures or []:
        if a in _REGISTRY:
            return _REGISTRY[a]
    names = ", ".join(architectures or ["(none)"])
    for a in architectures or []:
        if a in _REFUSED:
            raise GemqError(f"{a} is not supported: {_REFUSED[a]}.", f"use one of: {', '.join(supported())}.")
    if any(not a.endswith("ForCausalLM") for a in architectures or []) and architectures:
        raise GemqError(f"{names} is not a causal language model, nor a multimodal checkpoint whose text model "
                        "gemq-gguf takes.", f"convert a *ForCausalLM checkpoint; supported: {', '.join(supported())}.")
    raise GemqError(f"architecture {names} is not supported.", f"use one of: {', '.join(supported())}.")
