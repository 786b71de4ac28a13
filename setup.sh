#!/usr/bin/env bash
# One-time set-up on a fresh machine (re-running is cheap: every step skips work that is done).
#  1. Python dependencies (torch: the CPU build by default; set TORCH_SPEC to choose another).
#  2. The patched llama.cpp runtime: llama-cpp-python, gguf-py and the converter from the same pinned
#     llama.cpp, and the llama.cpp tools (cpp_patch/build.py; cached in ${GEMQ_GGUF_HOME:-~/.cache/gemq-gguf}).
# Extra arguments go to cpp_patch/build.py (e.g. --cuda).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install --quiet -e ".[test]"
"$PY" cpp_patch/build.py "$@"
