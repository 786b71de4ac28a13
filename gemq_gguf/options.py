"""What a conversion can be asked, as one small typed record per stage, with the defaults users get.

Each stage takes only its own record (calibration its `CalibOptions`, the allocation its
`AllocOptions`, ...), and the command line reads its defaults from here, so a default lives in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: candidate expert types of `--budget` (real ggml bits: IQ2_XXS 2.06 ... Q6_K 6.56)
DEFAULT_TYPES: tuple[str, ...] = ("IQ2_XXS", "Q2_K", "IQ3_XXS", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K")
#: candidate types of the non-expert tensors in a whole-file allocation (`--target-bpw` / `--target-size`)
NON_EXPERT_TYPES: tuple[str, ...] = DEFAULT_TYPES + ("Q8_0",)
STRATEGIES: tuple[str, ...] = ("gemq", "layerwise", "uniform")
GRANULARITIES: tuple[str, ...] = ("expert", "expert-proj", "tensor")
#: gradient targets: draws from the model's own predictions (true Fisher), or the text's next tokens
FISHER_LABELS: tuple[str, ...] = ("sampled", "data")
#: router-tuning losses (gemq.router_ft) and which epoch's routers ship
#: how calibration holds the model: `auto` streams a safetensors checkpoint too big for memory
#: (gemq.streaming, one decoder layer at a time), `stream` always does, `full` loads the whole model
CALIB_MEMORY: tuple[str, ...] = ("auto", "stream", "full")
LOSSES: tuple[str, ...] = ("kd", "ce", "route", "kd+route", "ce+route")
SELECT: tuple[str, ...] = ("best", "last")
#: `--cost-rows auto` (the default): the costs quantize this fraction of each expert matrix's rows when every
#: expert matrix has at least AUTO_COST_ROWS_MIN rows (real-size experts, where the cost pass is the bulk of a
#: conversion), and all rows (exact costs) below that: measured in docs/RESULTS.md (Scale, `--cost-rows`)
AUTO_COST_ROWS = 0.125
AUTO_COST_ROWS_MIN = 512


@dataclass(frozen=True)
class CalibOptions:
    """The calibration text and how statistics are gathered from it."""

    texts: tuple[str, ...] = ()          # FILE[:WEIGHT] specs; empty = the packaged mix
    tokens: int = 32768
    seq_len: int = 512
    seed: int = 0
    fisher: str = FISHER_LABELS[0]       # "sampled": measured better than "data" (docs/allocation.md)
    imatrix: Path | None = None          # a llama.cpp imatrix to quantize with instead of ours
    memory: str = CALIB_MEMORY[0]
    #: tokens (whole sequences, spread over the text) on which the non-expert weights' inputs and output
    #: gradients are kept for their costs (gemq.tensor_stats); 0: not recorded
    tensor_tokens: int = 2048


@dataclass(frozen=True)
class AllocOptions:
    """`--budget`: how the experts' types are chosen."""

    budget: float
    strategy: str = STRATEGIES[0]
    granularity: str = GRANULARITIES[0]
    types: tuple[str, ...] = DEFAULT_TYPES
    max_types: int = 3
    cost_rows: float | None = None       # fraction of each matrix's rows the costs quantize (1: exact); None: auto


@dataclass(frozen=True)
class FileTarget:
    """`--target-bpw X` or `--target-size SIZE`: what the whole written file may take.

    bpw is llama.cpp's meaning (llama-quantize --target-bpw, PR #15550): 8 x the bytes of every tensor's
    data / the number of weights of every tensor, norms and other float tensors included, metadata
    excluded. size is the whole file in bytes, metadata, tensor infos and alignment included: the file is
    never larger."""

    bpw: float | None = None
    size: int | None = None
    spec: str = ""                       # as the user wrote it (the report echoes it)

    def __post_init__(self) -> None:
        if (self.bpw is None) == (self.size is None):
            raise ValueError("a FileTarget is either a bpw or a size")

    def describe(self) -> str:
        if self.bpw is not None:
            return f"{self.bpw:g} bpw (whole file)"
        return f"{self.size:,} bytes" + (f" ({self.spec})" if self.spec and self.spec != str(self.size) else "")


@dataclass(frozen=True)
class WholeFileOptions:
    """`--target-bpw` / `--target-size`: one allocation over every quantizable tensor of the file."""

    target: FileTarget
    granularity: str = GRANULARITIES[0]
    types: tuple[str, ...] = DEFAULT_TYPES            # candidates of the routed experts
    tensor_types: tuple[str, ...] = NON_EXPERT_TYPES  # candidates of the other tensors
    max_types: int = 3
    strategy: str = STRATEGIES[0]                     # only gemq solves the joint problem
    cost_rows: float | None = None                    # as AllocOptions.cost_rows


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(spec: str) -> int:
    """'17.5GiB', '900MiB', '900MB', '123456789' -> bytes (rounded down: the file must fit)."""
    import re
    from decimal import Decimal, InvalidOperation

    from .errors import GemqError
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", spec)
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        raise GemqError(f"--target-size '{spec}' is not a size.",
                        "write bytes or a number with a unit: 123456789, 900MB, 900MiB, 17.5GiB (KB/MB/GB/TB = "
                        "powers of 1000, KiB/MiB/GiB/TiB = powers of 1024).")
    try:
        n = int(Decimal(m.group(1)) * _SIZE_UNITS[unit])
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        raise GemqError(f"--target-size '{spec}' is not a size.", "write e.g. 17.5GiB.") from None
    if n <= 0:
        raise GemqError(f"--target-size '{spec}' is not a positive size.", "write e.g. 17.5GiB.")
    return n


@dataclass(frozen=True)
class TuneOptions:
    """`--finetune-routers` / `--progressive K`: router tuning against the quantized experts."""

    loss: str = "kd+route"               # measured best on the demo model (docs/router_tuning.md)
    lr: float = 1e-4
    epochs: int = 2
    select: str = SELECT[0]
    progressive: int = 0                 # 0: tune once at the budget; K: reach it in K allocations


@dataclass(frozen=True)
class UniformTypes:
    """`--uniform TYPE`: every routed expert gets one type."""

    type: str


@dataclass(frozen=True)
class PlanFile:
    """`--plan FILE`: explicit types from a plan or an allocation report."""

    path: Path


ExpertTyping = UniformTypes | PlanFile | AllocOptions | WholeFileOptions


@dataclass(frozen=True)
class OutputOptions:
    """Where the file, its report and its picture go, and what is kept."""

    path: Path
    report_json: Path | None = None      # default: OUT with .json
    heatmap: Path | None = None          # default: OUT with .png
    work_dir: Path | None = None         # the intermediate float GGUF (default: next to the output)
    keep_intermediate: bool = False
    dry_run: bool = False
    save_imatrix: Path | None = None     # also write the calibration's imatrix for llama-quantize

    @property
    def report_path(self) -> Path:
        return self.report_json or self.path.with_suffix(".json")

    @property
    def heatmap_path(self) -> Path:
        return self.heatmap or self.path.with_suffix(".png")


@dataclass(frozen=True)
class VerifyOptions:
    """The check after writing (gemq_gguf.verify): how much calibration text, and when a file is broken."""

    chunks: int = 4                      # chunks of `ctx` tokens, the second half of each scored as
    ctx: int = 256                       # llama-perplexity scores them: 1024 tokens run, 508 scored
    #: mean KLD above which the file is refused; None: ln(vocabulary size), the most a file can be off
    #: while still doing better than a uniform guess (KL(p || uniform) = ln V - H(p)). On the demo
    #: (ln V = 10.80): uniform Q2_K without imatrix 8.34, the lowest budget 1.80, shuffled output rows 11.07
    max_kld: float | None = None


@dataclass(frozen=True)
class PolicyOptions:
    """Types of the tensors that are not routed experts (`--tensor-type`, `--non-expert`)."""

    tensor_types: tuple[str, ...] = ()
    non_expert: str | None = None


@dataclass(frozen=True)
class CacheOptions:
    """The cache of calibration statistics and cost tables (`--cache-dir`, `--no-cache`; gemq.cache)."""

    dir: Path | None = None              # default: ${GEMQ_GGUF_HOME:-~/.cache/gemq-gguf}/stats
    enabled: bool = True


@dataclass(frozen=True)
class ConvertRequest:
    """One conversion: the model, how its experts are typed, and each stage's options."""

    model: str
    output: OutputOptions
    experts: ExpertTyping
    policy: PolicyOptions = field(default_factory=PolicyOptions)
    calib: CalibOptions = field(default_factory=CalibOptions)
    tune: TuneOptions | None = None
    verify: VerifyOptions | None = field(default_factory=VerifyOptions)  # None: --no-verify
    cache: CacheOptions = field(default_factory=CacheOptions)
    verbose: bool = False
    trust_remote_code: bool = False  # let a checkpoint's own Python code (auto_map) run
