"""Architecture adapters: import this package to fill the registry."""
from . import models  # noqa: F401  (registers the adapters)
from .base import EXPERT_PROJS, ArchAdapter, MoeShape, adapter_for, register, supported

__all__ = ["EXPERT_PROJS", "ArchAdapter", "MoeShape", "adapter_for", "register", "supported"]
