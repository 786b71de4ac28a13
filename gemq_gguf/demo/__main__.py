"""python -m gemq_gguf.demo {build,eval,path}: build / evaluate the demo MoE checkpoint."""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

from ..errors import GemqError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gemq_gguf.demo", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the demo checkpoint (skipped if already built, unless --force)")
    e = sub.add_parser("eval", help="build the demo checkpoint and measure its held-out perplexity (slow)")
    for p in (b, e):
        p.add_argument("--out", type=pathlib.Path, help="checkpoint directory (default: "
                       "${GEMQ_GGUF_HOME:-~/.cache/gemq-gguf}/demo/smollm2-moe-6x256)")
        p.add_argument("--top-k", type=int, default=None, help="experts per token (default 3)")
        p.add_argument("--train", action="store_true",
                       help="retrain partition + routers instead of using the shipped file (maintainers)")
        p.add_argument("--write-routers", type=pathlib.Path, help="with --train: save the new routers file here")
        p.add_argument("--routers", type=pathlib.Path, help="use this partition/routers file instead of the shipped one")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    b.add_argument("--force", action="store_true", help="rebuild even if a current build exists")
    e.add_argument("--windows", type=int, default=None, help="512-token windows per eval domain (default 16)")
    e.add_argument("--json", type=pathlib.Path, help="write the results here (e.g. gemq_gguf/demo/EVAL.json)")
    sub.add_parser("path", help="print the default checkpoint directory (exit 1 if it is not built)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from . import build
    try:
        if args.cmd == "path":
            d = build.default_demo_dir()
            print(d)
            return 0 if build.is_built(d) else 1
        top_k = args.top_k or build.TOP_K
        routers = False if args.train else (args.routers or True)
        if args.cmd == "build":
            if args.train or args.top_k or args.routers:
                out = build.build_demo_model(args.out, top_k=top_k, routers=routers,
                                             write_routers=args.write_routers, progress=not args.quiet)
            else:
                out = build.ensure_demo_model(force=args.force, out=args.out, progress=not args.quiet)
            print(out)
            return 0
        from . import evaluate, text
        out, parts = build.build_demo_model(args.out, top_k=top_k, routers=routers, write_routers=args.write_routers,
                                            progress=not args.quiet, return_parts=True)
        r = evaluate.evaluate_demo(out, parts, n_windows=args.windows or text.EVAL_WINDOWS,
                                   progress=not args.quiet, json_path=args.json)
        s = json.dumps(r, indent=1)
        if args.json:
            args.json.write_text(s + "\n")
        print(s)
        return 0
    except GemqError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
