"""`convert.py` / `gemq-gguf`: a thin argument layer over `pipeline.convert`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.logging import RichHandler

from .errors import GemqError
from .pipeline import ConvertOptions, convert
from .router_ft import DEFAULT_EPOCHS, DEFAULT_LOSS, DEFAULT_LR, LOSSES, SELECT
from .stats import FISHER_LABELS

EXAMPLES = """examples:
  python convert.py demo --budget 3.0 -o demo-gemq-3.0.gguf
  python convert.py ./Qwen3-30B-A3B --budget 3.0 -o qwen3-30b-a3b-gemq-3.0.gguf
  python convert.py ./Qwen3-30B-A3B --budget 3.0 --granularity tensor -o stock-compatible.gguf
  python convert.py ./Mixtral-8x7B --uniform Q4_K --tensor-type attn=Q8_0 -o mixtral-q4k.gguf
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert.py", description="Hugging Face MoE -> GGUF with a quant type per expert.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="Hugging Face checkpoint folder, or 'demo' for the built-in demo MoE")
    p.add_argument("-o", "--out", type=Path, required=True, help="output GGUF file")
    a = p.add_argument_group("expert types (exactly one)")
    a.add_argument("--budget", type=float, help="average bits per routed-expert weight, in real ggml bpw (Q2_K = 2.625)")
    a.add_argument("--uniform", metavar="TYPE", help="every routed expert gets TYPE (e.g. Q4_K)")
    a.add_argument("--plan", type=Path, help="JSON plan (or an allocation report) with a type per expert")
    g = p.add_argument_group("allocation (with --budget)")
    g.add_argument("--strategy", choices=("gemq", "layerwise", "uniform"), default="gemq")
    g.add_argument("--granularity", choices=("expert", "expert-proj", "tensor"), default="expert",
                   help="expert: gate/up/down share a type; expert-proj: each its own; tensor: one type per "
                        "layer-projection (loads in stock llama.cpp)")
    g.add_argument("--types", help="comma-separated candidate ggml types (default IQ2_XXS,Q2_K,IQ3_XXS,Q3_K,IQ4_XS,Q4_K,Q5_K,Q6_K)")
    g.add_argument("--max-types", type=int, default=3, help="at most this many types per layer-projection (default 3)")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", nargs="+", default=[], metavar="FILE[:WEIGHT]", help="text or jsonl files (default: built-in mix)")
    c.add_argument("--calib-tokens", type=int, default=32768)
    c.add_argument("--seq-len", type=int, default=512)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--fisher", choices=FISHER_LABELS, default=FISHER_LABELS[0],
                   help="gradient targets: sampled (default) = draws from the model's own predictions (true Fisher = "
                        "Hessian of the KLD); data = the calibration text's next tokens (empirical Fisher, the paper's)")
    c.add_argument("--imatrix", type=Path, help="llama.cpp imatrix GGUF to use instead of our own statistics")
    r = p.add_argument_group("router tuning")
    r.add_argument("--finetune-routers", action="store_true", help="train the routers against the quantized experts")
    r.add_argument("--ft-loss", choices=LOSSES, default=DEFAULT_LOSS,
                   help=f"ce: LM cross-entropy (the paper's); kd: KL to the full-precision model; route: match the "
                        f"full-precision routing; ce+route / kd+route: both (default {DEFAULT_LOSS}, docs/router_tuning.md)")
    r.add_argument("--ft-lr", type=float, default=DEFAULT_LR, help="AdamW learning rate of the routers")
    r.add_argument("--ft-epochs", type=int, default=DEFAULT_EPOCHS, help="passes over the calibration tokens")
    r.add_argument("--ft-select", choices=SELECT, default=SELECT[0],
                   help="best: keep the epoch with the lowest held-out KD, the untuned routers included; last: the last epoch")
    r.add_argument("--progressive", type=int, default=0, metavar="K",
                   help="reach the budget in K allocations from budget+1 down, tuning the routers at each")
    t = p.add_argument_group("other tensors and output")
    t.add_argument("--tensor-type", action="append", default=[], metavar="PATTERN=TYPE",
                   help="type for a category (embd, output, attn, shexp, ffn, router, other) or a regex on GGUF names")
    t.add_argument("--non-expert", metavar="TYPE", help="one type for every non-expert matrix (routers stay F32)")
    t.add_argument("--work-dir", type=Path, help="where the intermediate float GGUF goes (default: next to the output)")
    t.add_argument("--keep-intermediate", action="store_true", help="keep the float GGUF next to the output")
    t.add_argument("--report-json", type=Path, help="report path (default: OUT with .json)")
    t.add_argument("--heatmap", type=Path, help="allocation picture (default: OUT with .png)")
    t.add_argument("--dry-run", action="store_true", help="stop after the allocation; write the report only")
    t.add_argument("-v", "--verbose", action="store_true")
    return p


def options_from_args(ns: argparse.Namespace) -> ConvertOptions:
    types = [s.strip().upper() for s in ns.types.split(",")] if ns.types else None
    return ConvertOptions(model=ns.model, out=ns.out, uniform=ns.uniform, plan=ns.plan, budget=ns.budget,
                          strategy=ns.strategy, granularity=ns.granularity, types=types, max_types=ns.max_types,
                          tensor_types=ns.tensor_type, non_expert=ns.non_expert, imatrix=ns.imatrix, calib=ns.calib,
                          calib_tokens=ns.calib_tokens, seq_len=ns.seq_len, seed=ns.seed, fisher=ns.fisher,
                          finetune_routers=ns.finetune_routers, ft_loss=ns.ft_loss, ft_lr=ns.ft_lr,
                          ft_epochs=ns.ft_epochs, ft_select=ns.ft_select, progressive=ns.progressive,
                          work_dir=ns.work_dir, keep_intermediate=ns.keep_intermediate, dry_run=ns.dry_run,
                          report_json=ns.report_json, heatmap=ns.heatmap, verbose=ns.verbose)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(show_path=False, show_time=False)])
    try:
        convert(options_from_args(ns))
    except GemqError as e:
        print(f"error: {e.problem}\n  fix: {e.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
