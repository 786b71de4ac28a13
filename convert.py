#!/usr/bin/env python3
"""Hugging Face MoE checkpoint -> GGUF with a quant type per expert. See `python convert.py --help`."""
import sys

from gemq_gguf.cli import main

if __name__ == "__main__":
    sys.exit(main())
