"""gemq-gguf: per-expert mixed-precision GGUF files for Mixture-of-Experts LLMs (GEMQ allocation)."""

__version__ = "0.1.0"
