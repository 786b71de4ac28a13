"""How llama.cpp runs, for both backends: one set of settings, as llama-cpp-python arguments or as flags."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunOptions:
    """How llama.cpp runs: CPU threads, KV cache type (F32 for exactness tests), offload, flash attention."""

    n_threads: int | None = None
    f32_kv: bool = False
    n_gpu_layers: int = 0
    flash_attn: bool = False

    def perplexity_args(self) -> list[str]:
        """The same settings as llama-perplexity flags."""
        args = ["-ngl", str(self.n_gpu_layers), "-fa", "on" if self.flash_attn else "off"]
        if self.n_threads:
            args += ["-t", str(self.n_threads)]
        if self.f32_kv:
            args += ["-ctk", "f32", "-ctv", "f32"]
        return args
