"""Architecture adapters: import this package to fill the registry."""
from . import models  # noqa: F401  (registers the adapters)
from .base import ArchAdapter, MoeShape, adapter_for, register, supported

__all__ = ["ArchAdapter", "MoeShape", "adapter_for", "register", "supported"]
