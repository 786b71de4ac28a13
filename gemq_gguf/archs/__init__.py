"""Architecture adapters: import this package to fill the registry."""
from . import families, sigmoid_families  # noqa: F401  (register the adapters)
from . import refusals  # noqa: F401  (after families: a refused class must not be registered)
from .base import ArchAdapter, MoeShape
from .experts import ExpertsCall, ExpertsView
from .registry import adapter_for, register, supported
from .text_model import key_mapping, load_text_model, text_config

__all__ = ["ArchAdapter", "ExpertsCall", "ExpertsView", "MoeShape", "adapter_for", "key_mapping", "load_text_model",
           "register", "supported", "text_config"]
