"""gemq-gguf: per-expert mixed-precision GGUF files for Mixture-of-Experts LLMs (GEMQ allocation)."""
import os

__version__ = "0.1.0"

# Byte-identical files whatever torch's thread count: MKL's GEMM sums in a thread-count-dependent order
# unless its strict reproducibility mode is on (read at MKL's first call, so set before any torch work).
# Without it router tuning's weights differed between 1 and 2 threads (tests/test_determinism.py).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
