"""Quality of a GGUF file against a reference GGUF, measured exactly the way `llama-perplexity` does.

`python -m gemq_gguf.evaluate MODEL --ref REF [--text FILE ...]`: a thin layer over evaluate_gguf that
reads the text files, prints the table and optionally writes the result as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ..data import eval_texts
from ..errors import GemqError
from .options import RunOptions
from .run import evaluate_gguf, print_result


def read_texts(paths: Sequence[Path | str]) -> dict[str, str]:
    """Domain name (file stem) -> text, one entry per file."""
    texts: dict[str, str] = {}
    for p in map(Path, paths):
        if not p.is_file():
            raise GemqError(f"Text file {p} does not exist.", "check the path.")
        if p.stem in texts:
            raise GemqError(f"Two text files are named {p.stem}.", "give each domain file a distinct name.")
        texts[p.stem] = p.read_text(encoding="utf-8")
    return texts


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m gemq_gguf.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, help="GGUF file to judge")
    ap.add_argument("--ref", type=Path, required=True, help="reference GGUF (full precision)")
    ap.add_argument("--text", type=Path, nargs="+", default=None,
                    help="text files, one domain each (default: the packaged prose/tech/code/math eval text)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=None, help="at most this many chunks per file")
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    ap.add_argument("--backend", choices=("python", "llama-perplexity"), default="python")
    ap.add_argument("--ref-cache", type=Path, default=None, help="directory caching the reference's log-probs")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--f32-kv", action="store_true", help="F32 KV cache (exactness tests)")
    ap.add_argument("--llama-perplexity", type=Path, default=None, help="path of the llama-perplexity binary")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        texts = read_texts(args.text) if args.text else eval_texts()
        result = evaluate_gguf(args.model, args.ref, texts, args.ctx, args.chunks,
                               backend=args.backend, ref_cache_dir=args.ref_cache,
                               opts=RunOptions(n_threads=args.threads, f32_kv=args.f32_kv),
                               binary=args.llama_perplexity)
    except GemqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_result(result)
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=2))
    return 0
