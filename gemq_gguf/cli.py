"""`convert.py` / `gemq-gguf`: a thin argument layer over `pipeline.convert`."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from rich.logging import RichHandler

from .errors import GemqError
from .options import (
    AUTO_COST_ROWS,
    AUTO_COST_ROWS_MIN,
    CALIB_MEMORY,
    DEFAULT_TYPES,
    FISHER_LABELS,
    GRANULARITIES,
    LOSSES,
    SELECT,
    STRATEGIES,
    NON_EXPERT_TYPES,
    AllocOptions,
    CacheOptions,
    CalibOptions,
    ConvertRequest,
    ExpertTyping,
    FileTarget,
    OutputOptions,
    PlanFile,
    PolicyOptions,
    TuneOptions,
    UniformTypes,
    VerifyOptions,
    WholeFileOptions,
    parse_size,
)
from .pipeline import convert

EXAMPLES = """examples:
  python convert.py demo --budget 3.0 --calib-tokens 4096 -o demo-gemq-3.0.gguf
  python convert.py ./Qwen3-30B-A3B --budget 3.0 -o qwen3-30b-a3b-gemq-3.0.gguf
  python convert.py ./Qwen3-30B-A3B --budget 3.0 --granularity tensor -o stock-compatible.gguf
  python convert.py ./Mixtral-8x7B --uniform Q4_K --tensor-type attn=Q8_0 -o mixtral-q4k.gguf
  python convert.py ./Qwen3-30B-A3B --target-size 17.5GiB -o qwen3-30b-a3b-17.5g.gguf
"""


def _cost_rows(text: str) -> float | None:
    """`--cost-rows`: a fraction, or `auto` (None: chosen by the experts' size, `costs.cost_fraction`)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction or auto (e.g. 0.125, 1, auto)") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert.py", description="Hugging Face MoE -> GGUF with a quant type per expert.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="Hugging Face checkpoint folder, or 'demo' for the built-in demo MoE")
    p.add_argument("-o", "--out", type=Path, required=True, help="output GGUF file")
    a = p.add_argument_group("expert types (exactly one)")
    a.add_argument("--budget", type=float, help="average bits per routed-expert weight, in real ggml bpw (Q2_K = 2.625)")
    a.add_argument("--uniform", metavar="TYPE", help="every routed expert gets TYPE (e.g. Q4_K)")
    a.add_argument("--plan", type=Path, help="JSON plan (or an allocation report) with a type per expert")
    a.add_argument("--target-bpw", type=float, metavar="X",
                   help="one allocation over the whole file (experts and the other tensors) at X bits per weight: "
                        "8 x all tensor data bytes / all weights, metadata excluded (llama-quantize's meaning)")
    a.add_argument("--target-size", metavar="SIZE",
                   help="one allocation over the whole file, which is never larger than SIZE (17.5GiB, 900MiB, "
                        "900MB, or bytes)")
    g = p.add_argument_group("allocation (with --budget)")
    g.add_argument("--strategy", choices=STRATEGIES, default=STRATEGIES[0])
    g.add_argument("--granularity", choices=GRANULARITIES, default=GRANULARITIES[0],
                   help="expert: gate/up/down share a type; expert-proj: each its own; tensor: one type per "
                        "layer-projection (loads in stock llama.cpp)")
    g.add_argument("--types", help=f"comma-separated candidate ggml types (default {','.join(DEFAULT_TYPES)})")
    g.add_argument("--tensor-candidates", metavar="TYPES",
                   help=f"with --target-bpw/--target-size: candidate types of the non-expert tensors "
                        f"(default {','.join(NON_EXPERT_TYPES)})")
    g.add_argument("--max-types", type=int, default=AllocOptions.max_types,
                   help=f"at most this many types per layer-projection (default {AllocOptions.max_types})")
    g.add_argument("--cost-rows", type=_cost_rows, default=AllocOptions.cost_rows, metavar="FRACTION|auto",
                   help="estimate the costs from this seeded fraction of each expert matrix's rows (each candidate "
                        "type quantizes and multiplies only those; the file's types are still quantized in full); "
                        f"1 = exact costs; default auto = {AUTO_COST_ROWS:g} when every expert matrix has at least "
                        f"{AUTO_COST_ROWS_MIN} rows (e.g. Qwen3-30B-A3B's 768 x 2048), else 1")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", nargs="+", default=[], metavar="FILE[:WEIGHT]", help="text or jsonl files (default: built-in mix)")
    c.add_argument("--calib-tokens", type=int, default=CalibOptions.tokens)
    c.add_argument("--seq-len", type=int, default=CalibOptions.seq_len)
    c.add_argument("--seed", type=int, default=CalibOptions.seed)
    c.add_argument("--fisher", choices=FISHER_LABELS, default=CalibOptions.fisher,
                   help="gradient targets: sampled (default) = draws from the model's own predictions (true Fisher = "
                        "Hessian of the KLD); data = the calibration text's next tokens (empirical Fisher, the paper's)")
    c.add_argument("--imatrix", type=Path, help="llama.cpp imatrix GGUF to quantize with instead of our own statistics")
    c.add_argument("--calib-memory", choices=CALIB_MEMORY, default=CalibOptions.memory,
                   help="stream = hold one decoder layer's weights at a time (read from the safetensors shards; "
                        "same statistics, one extra forward; router tuning streams too); full = load the whole model; auto (default) = stream "
                        "when the model would not fit comfortably in memory")
    c.add_argument("--cache-dir", type=Path, help="where calibration statistics and cost tables are cached "
                                                 "(default ${GEMQ_GGUF_HOME:-~/.cache/gemq-gguf}/stats)")
    c.add_argument("--no-cache", action="store_true", help="neither read nor write the statistics cache")
    r = p.add_argument_group("router tuning")
    r.add_argument("--finetune-routers", action="store_true", help="train the routers against the quantized experts")
    r.add_argument("--ft-loss", choices=LOSSES, default=TuneOptions.loss,
                   help=f"ce: LM cross-entropy (the paper's); kd: KL to the full-precision model; route: match the "
                        f"full-precision routing; ce+route / kd+route: both (default {TuneOptions.loss}, "
                        f"docs/router_tuning.md)")
    r.add_argument("--ft-lr", type=float, default=TuneOptions.lr, help="AdamW learning rate of the routers")
    r.add_argument("--ft-epochs", type=int, default=TuneOptions.epochs, help="passes over the calibration tokens")
    r.add_argument("--ft-select", choices=SELECT, default=TuneOptions.select,
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
    t.add_argument("--save-imatrix", type=Path, metavar="FILE",
                   help="with --budget: also write the calibration's importance matrix (llama-quantize --imatrix reads it)")
    t.add_argument("--dry-run", action="store_true", help="stop after the allocation; write the report only")
    t.add_argument("--trust-remote-code", action="store_true",
                   help="let a checkpoint's own Python code (auto_map) run where transformers has no class for it; "
                        "off by default")
    t.add_argument("--no-verify", action="store_true",
                   help="skip the last step: running the written file in llama.cpp against the unquantized model "
                        f"({VerifyOptions.chunks} x {VerifyOptions.ctx} calibration tokens)")
    t.add_argument("-v", "--verbose", action="store_true")
    return p


def _expert_typing(ns: argparse.Namespace) -> ExpertTyping:
    given = [x for x in ("uniform", "plan", "budget", "target_bpw", "target_size") if getattr(ns, x) is not None]
    if len(given) != 1:
        raise GemqError("say how to type the experts: exactly one of --budget, --uniform, --plan, --target-bpw or "
                        "--target-size.", "e.g. --budget 3.0 (GEMQ, routed experts), --target-size 17.5GiB (whole "
                        "file), or --uniform Q4_K.")
    if ns.uniform is not None:
        return UniformTypes(ns.uniform)
    if ns.plan is not None:
        return PlanFile(ns.plan)
    types = tuple(s.strip().upper() for s in ns.types.split(",")) if ns.types else DEFAULT_TYPES
    if ns.target_bpw is not None or ns.target_size is not None:
        target = (FileTarget(bpw=ns.target_bpw, spec=str(ns.target_bpw)) if ns.target_bpw is not None
                  else FileTarget(size=parse_size(ns.target_size), spec=ns.target_size))
        tensor_types = (tuple(s.strip().upper() for s in ns.tensor_candidates.split(","))
                        if ns.tensor_candidates else NON_EXPERT_TYPES)
        return WholeFileOptions(target=target, granularity=ns.granularity, types=types, tensor_types=tensor_types,
                                max_types=ns.max_types, strategy=ns.strategy, cost_rows=ns.cost_rows)
    return AllocOptions(budget=ns.budget, strategy=ns.strategy, granularity=ns.granularity, types=types,
                        max_types=ns.max_types, cost_rows=ns.cost_rows)


def request_from_args(ns: argparse.Namespace) -> ConvertRequest:
    tune = None
    if ns.finetune_routers or ns.progressive:
        tune = TuneOptions(loss=ns.ft_loss, lr=ns.ft_lr, epochs=ns.ft_epochs, select=ns.ft_select,
                           progressive=ns.progressive)
    return ConvertRequest(
        model=ns.model,
        output=OutputOptions(path=ns.out, report_json=ns.report_json, heatmap=ns.heatmap, work_dir=ns.work_dir,
                             keep_intermediate=ns.keep_intermediate, dry_run=ns.dry_run, save_imatrix=ns.save_imatrix),
        experts=_expert_typing(ns),
        policy=PolicyOptions(tensor_types=tuple(ns.tensor_type), non_expert=ns.non_expert),
        calib=CalibOptions(texts=tuple(ns.calib), tokens=ns.calib_tokens, seq_len=ns.seq_len, seed=ns.seed,
                           fisher=ns.fisher, imatrix=ns.imatrix, memory=ns.calib_memory),
        tune=tune, cache=CacheOptions(dir=ns.cache_dir, enabled=not ns.no_cache),
        verify=None if ns.no_verify else VerifyOptions(), verbose=ns.verbose, trust_remote_code=ns.trust_remote_code)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM takes Ctrl-C's path: the same cleanup, the same message."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(show_path=False, show_time=False)])
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        convert(request_from_args(ns))
    except GemqError as e:
        print(f"error: {e.problem}\n  fix: {e.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written and the temporary files are removed. To resume, rerun the same "
              "command.", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
