"""Router fine-tuning against the quantized experts, for `--finetune-routers`.

Quantization changes what the experts return, so the hidden states the later routers see drift and
tokens go to other experts than in full precision. We replace every routed expert's weights in the
Hugging Face model by ggml's round trip of its planned type (exactly what llama.cpp will hold) and
train only the router weights (`ffn_gate_inp`, and the shared-expert gate `ffn_gate_inp_shexp`) on the
calibration tokens, with everything else frozen. The passes run on a `Runner`: the whole model in
memory (`ModelRunner`), or one decoder layer at a time (`router_stream.StreamedRunner`).

Losses:
- `ce`: the LM cross-entropy on the calibration text (the paper's choice).
- `route`: routing match, the mean over MoE layers of KL(full-precision router distribution ||
  quantized model's) per token, on logits divided by the full-precision logits' spread over experts
  times ROUTE_TEMPERATURE. Teaches each router to pick, from the drifted hidden states of the quantized
  model, the experts full precision picks (the routing-shift target). The scaling matters: routers are
  often nearly flat (the demo's logits differ by ~1e-2), so plain softmaxes agree to 1e-4 in KL while
  7 % of the top-k choices differ. The teacher pass keeps the centered full-precision router logits
  (n_layers x n_experts float16 per token; centered, so float16 keeps their differences).
- `ce+route`, `kd+route`: the LM loss plus ROUTE_WEIGHT x the routing-match loss.
- `kd`: KL(full precision || quantized) over next-token distributions. Only one model is held: the
  teacher's top-K log-probs (logit − logsumexp) per token are cached in one full-precision pass
  before the experts are quantized (K = 64: 64 × 8 bytes per token). The tail beyond the top K is one
  bucket: the loss is the exact KL of the (K + 1)-outcome distributions (top-K tokens, "anything
  else"), whose tail term is p_tail · log(p_tail / q_tail) with q_tail = 1 − Σ_topK q. By the log-sum
  inequality it is a lower bound of the full KL that is tight when the tail is negligible or when
  the student keeps the tail's shape.

Routers train in float32 master copies (AdamW, no weight decay: decay would flatten the routing);
the model's own copies (bf16 on GPU) are refreshed after every step, and the float32 masters are
what ships (llama.cpp keeps routers in F32). A fixed seed gives bit-identical routers on the same
device and thread count: shuffling uses a seeded generator and torch runs deterministic algorithms.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..archs import ArchAdapter
from ..errors import GemqError
from ..ggml.imatrix import expert_imatrix
from ..ggml.names import expert_tensor_name, router_tensor_name
from ..ggml.quant import QuantCache, dequantize, roundtrip
from ..ggml.types import fitting_type
from ..options import LOSSES, SELECT, TuneOptions
from ..plan import ExpertPlan
from .hooks import frozen
from .routing import Routes, record_routing, routing_shift

ROUTE_WEIGHT = 1.0
ROUTE_TEMPERATURE = 0.5  # in units of the per-token std of the full-precision router logits
TEACHER_TOP_K = 64
log = logging.getLogger(__name__)


# -- the model as llama.cpp computes it ------------------------------------------------------------

def router_tensors(model: nn.Module, adapter: ArchAdapter) -> dict[str, nn.Parameter]:
    """Every router parameter of the model keyed by its GGUF tensor name (HF shape = GGUF numpy shape)."""
    shape = adapter.moe_shape(model.config)
    return {router_tensor_name(l, suffix): p for l in shape.moe_layers
            for suffix, p in adapter.router_params(adapter.moe_block(model, l)).items()}


def quantize_experts_(model: nn.Module, adapter: ArchAdapter, plan: ExpertPlan,
                      imatrix: dict[str, np.ndarray] | None, cache: QuantCache | None = None) -> None:
    """Replace every routed expert's matrices, in place, by ggml's round trip of its planned type.

    The effective type is llama.cpp's fallback for the row width, as the writer does; bytes already in
    the writer's cache (from the cost estimation) are dequantized instead of quantized again.
    """
    shape = adapter.moe_shape(model.config)
    for l in shape.moe_layers:
        quantize_block_(adapter, adapter.moe_block(model, l), l, shape.n_experts, plan, imatrix, cache)


def quantize_block_(adapter: ArchAdapter, block: nn.Module, layer: int, n_experts: int, plan: ExpertPlan,
                    imatrix: dict[str, np.ndarray] | None, cache: QuantCache | None = None) -> None:
    """`quantize_experts_` for the MoE block of one layer (what a layer-streamed student does on every load)."""
    view = adapter.experts(block)
    for e in range(n_experts):
        w = view.weights(e)
        view.set_weights(e, {p: torch.from_numpy(_roundtrip(w[p], layer, e, p, plan[(layer, p)][e], imatrix, cache,
                                                            n_experts)) for p in view.projs})


def _roundtrip(w: torch.Tensor, layer: int, expert: int, proj: str, planned: str,
               imatrix: dict[str, np.ndarray] | None, cache: QuantCache | None, n_experts: int) -> np.ndarray:
    rows = w.detach().to("cpu", torch.float32).numpy()
    t = fitting_type(planned, rows.shape[1])
    key = (expert_tensor_name(layer, proj), expert, t)
    if cache is not None and key in cache:
        return dequantize(cache[key], t, rows.shape[1])
    imat = expert_imatrix(imatrix, layer, proj, n_experts) if imatrix else None
    return roundtrip(rows, t, None if imat is None else imat[expert])


# -- teacher and losses ----------------------------------------------------------------------------

@dataclass
class Teacher:
    """The full-precision model's top-K next-token log-probs and routing, per calibration sequence."""

    logp: torch.Tensor               # [N, L, K] float32: top-K log-probs (logit − logsumexp)
    idx: torch.Tensor                # [N, L, K] int64 token ids
    routing: dict[int, torch.Tensor]  # layer -> [N, L, k] selected experts
    ce: float                        # the teacher's own mean next-token CE
    router_logits: dict[int, torch.Tensor]  # layer -> [N, L, n_experts] float16, centered per token

    def rows(self, sel: torch.Tensor) -> Teacher:
        return Teacher(self.logp[sel], self.idx[sel], {l: r[sel] for l, r in self.routing.items()}, self.ce,
                       {l: r[sel] for l, r in self.router_logits.items()})


def _device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _batches(n: int, batch_size: int, order: torch.Tensor | None = None) -> list[torch.Tensor]:
    idx = torch.arange(n) if order is None else order
    return [idx[i:i + batch_size] for i in range(0, n, batch_size)]


def teacher_pass(model: nn.Module, adapter: ArchAdapter, tokens: torch.Tensor, *, top_k: int = TEACHER_TOP_K,
                 batch_size: int = 4, progress: bool = False) -> Teacher:
    """Cache the full-precision targets of KD and the full-precision routing (call before quantizing)."""
    batches = []
    with record_routing(model, adapter, logits=True) as routes, torch.no_grad():
        for rows in _progress(_batches(len(tokens), batch_size), progress, "teacher"):
            batch = tokens[rows].to(_device(model))
            batches.append(teacher_batch(model(input_ids=batch, use_cache=False).logits, batch, top_k))
    return teacher_from(batches, routes, tokens.shape)


def teacher_batch(logits: torch.Tensor, batch: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One batch's teacher targets: top-K log-probs, their token ids, and the CE summed over its rows."""
    logits = logits.float()
    top, ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    ce = float(ce_loss(logits, batch.to(logits.device))) * len(batch)
    return (top - logits.logsumexp(-1, keepdim=True)).cpu(), ids.cpu(), ce


def teacher_from(batches: list[tuple[torch.Tensor, torch.Tensor, float]], routes: Routes,
                 shape: tuple[int, int]) -> Teacher:
    """The Teacher of the batches' `teacher_batch` results and the routing recorded meanwhile."""
    n, seq = shape
    return Teacher(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), _per_sequence(routes.ids, n, seq),
                   sum(b[2] for b in batches) / n, _per_sequence(routes.logits, n, seq))


def _per_sequence(recorded: dict[int, list[torch.Tensor]], n: int, seq: int) -> dict[int, torch.Tensor]:
    return {l: torch.cat(r).reshape(n, seq, -1) for l, r in recorded.items()}


def ce_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def kd_loss(logits: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) on the top-K tokens plus one tail bucket."""
    logits = logits.float()
    s_logp = logits.gather(-1, t_idx) - logits.logsumexp(-1, keepdim=True)
    p = t_logp.exp()
    kl = (p * (t_logp - s_logp)).sum(-1)
    p_tail = (1.0 - p.sum(-1)).clamp_min(0.0)
    log_q_tail = torch.log((-torch.expm1(s_logp.logsumexp(-1).clamp_max(-1e-7))).clamp_min(1e-30))
    tail = torch.where(p_tail > 0, p_tail * (torch.log(p_tail.clamp_min(1e-30)) - log_q_tail), torch.zeros_like(p_tail))
    return (kl + tail).mean()


def route_loss(student: dict[int, list[torch.Tensor]], teacher: dict[int, torch.Tensor],
               temperature: float = ROUTE_TEMPERATURE) -> torch.Tensor:
    """Mean over MoE layers and tokens of KL(teacher || student) between the router distributions
    softmax(z / (temperature * std_e(z_teacher))): scale-free, so nearly flat routers still learn.

    `student[l]` holds the [T, n_experts] router logits of one forward; `teacher[l]` is [B, L, n_experts]."""
    terms = []
    for l, (s,) in student.items():
        t = teacher[l].to(s.device, torch.float32).reshape(s.shape)
        scale = temperature * t.std(-1, keepdim=True).clamp_min(1e-6)
        t_logp, s_logp = F.log_softmax(t / scale, -1), F.log_softmax(s / scale, -1)
        terms.append((t_logp.exp() * (t_logp - s_logp)).sum(-1).mean())
    return torch.stack(terms).mean()


def _batch_loss(model: nn.Module, adapter: ArchAdapter, tokens: torch.Tensor, teacher: Teacher | None,
                loss: str) -> torch.Tensor:
    """The training loss of one batch: `ce`, `kd`, `route`, or an LM loss + ROUTE_WEIGHT x `route`."""
    parts = loss.split("+")
    dev = _device(model)
    with record_routing(model, adapter, grad=True) if "route" in parts else contextlib.nullcontext() as routes:
        logits = model(input_ids=tokens.to(dev), use_cache=False).logits
    total = lm_loss(logits, tokens, teacher, parts)
    if "route" in parts:
        assert teacher is not None
        total = total + ROUTE_WEIGHT * route_loss(routes.logits, teacher.router_logits).to(total.device)
    return total


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor, teacher: Teacher | None, parts: list[str]) -> torch.Tensor:
    """The LM part (`ce`, `kd` or neither: zero) of the training loss of one batch, from its logits."""
    total = torch.zeros((), device=logits.device)
    if "ce" in parts:
        total = total + ce_loss(logits, tokens.to(logits.device))
    if "kd" in parts:
        assert teacher is not None
        total = total + kd_loss(logits, teacher.logp.to(logits.device), teacher.idx.to(logits.device))
    return total


@dataclass
class Score:
    """A no-grad pass of the (quantized) model over held-out tokens."""

    kd: float
    ce: float
    shift: dict[int, float]
    route: float  # mean router KL(full precision || quantized), the `route` loss

    @property
    def mean_shift(self) -> float:
        return float(np.mean(list(self.shift.values()))) if self.shift else 0.0


def score(model: nn.Module, adapter: ArchAdapter, tokens: torch.Tensor, teacher: Teacher,
          batch_size: int = 4) -> Score:
    """KD loss, CE loss and routing shift of the model on `tokens` (whose teacher rows are `teacher`)."""
    sums = []
    with record_routing(model, adapter, logits=True) as routes, torch.no_grad():
        for rows in _batches(len(tokens), batch_size):
            logits = model(input_ids=tokens[rows].to(_device(model)), use_cache=False).logits
            sums.append(score_batch(logits, tokens[rows], teacher.logp[rows], teacher.idx[rows]))
    return score_from(sums, routes, teacher, tokens.shape)


def score_batch(logits: torch.Tensor, batch: torch.Tensor, t_logp: torch.Tensor,
                t_idx: torch.Tensor) -> tuple[float, float]:
    """One batch's KD (against its teacher rows) and CE, summed over its rows."""
    logits = logits.float()
    kd = float(kd_loss(logits, t_logp.to(logits.device), t_idx.to(logits.device))) * len(batch)
    return kd, float(ce_loss(logits, batch.to(logits.device))) * len(batch)


def score_from(sums: list[tuple[float, float]], routes: Routes, teacher: Teacher, shape: tuple[int, int]) -> Score:
    """The Score of the batches' `score_batch` sums and the routing recorded meanwhile."""
    n, seq = shape
    q_logits = {l: [torch.cat(r).float()] for l, r in routes.logits.items()}
    return Score(sum(s[0] for s in sums) / n, sum(s[1] for s in sums) / n,
                 routing_shift(teacher.routing, _per_sequence(routes.ids, n, seq)),
                 float(route_loss(q_logits, teacher.router_logits)))


# -- training --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _deterministic(seed: int, threads: int | None) -> Iterator[None]:
    """Seeded, deterministic torch for the duration; the previous settings come back afterwards."""
    was_det, was_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_det)
        torch.set_num_threads(was_threads)


class Runner(Protocol):
    """What router tuning runs its passes on: the whole model in memory (`ModelRunner`), or the model
    streamed one decoder layer at a time (`router_stream.StreamedRunner`). Router values are float32
    tensors keyed by GGUF name."""

    def teacher_pass(self, tokens: torch.Tensor, progress: bool = False) -> Teacher: ...

    def quantize(self, plan: ExpertPlan) -> None: ...

    def score(self, tokens: torch.Tensor, teacher: Teacher, batch_size: int = 4) -> Score: ...

    def routers(self) -> dict[str, torch.Tensor]: ...

    def set_routers(self, values: dict[str, torch.Tensor]) -> None: ...

    def training(self) -> ContextManager[Any]: ...

    def step(self, tokens: torch.Tensor, teacher: Teacher | None,
             loss: str) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]: ...


class ModelRunner:
    """Router tuning on the whole model in memory; `imatrix` and `cache` serve `quantize`."""

    def __init__(self, model: nn.Module, adapter: ArchAdapter, imatrix: dict[str, np.ndarray] | None = None,
                 cache: QuantCache | None = None) -> None:
        self.model, self.adapter, self.imatrix, self.cache = model, adapter, imatrix, cache
        self.params = router_tensors(model, adapter)

    def teacher_pass(self, tokens: torch.Tensor, progress: bool = False) -> Teacher:
        return teacher_pass(self.model, self.adapter, tokens, progress=progress)

    def quantize(self, plan: ExpertPlan) -> None:
        """The experts, now full precision, replaced in place by their round trip per `plan`."""
        quantize_experts_(self.model, self.adapter, plan, self.imatrix, self.cache)

    def score(self, tokens: torch.Tensor, teacher: Teacher, batch_size: int = 4) -> Score:
        return score(self.model, self.adapter, tokens, teacher, batch_size)

    def routers(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().clone() for n, p in self.params.items()}

    def set_routers(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(values[n])

    def training(self) -> ContextManager[Any]:
        return frozen(self.model, self.params.values())

    def step(self, tokens: torch.Tensor, teacher: Teacher | None,
             loss: str) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """One batch's loss and the routers' gradients (None: no gradient, e.g. the shared-expert gate
        under `route` alone)."""
        value = _batch_loss(self.model, self.adapter, tokens, teacher, loss)
        value.backward()
        grads = {}
        for n, p in self.params.items():
            grads[n] = None if p.grad is None else p.grad.float()
            p.grad = None
        return value.detach(), grads


def finetune_routers(runner: Runner, tokens: torch.Tensor, *, loss: str = TuneOptions.loss,
                     teacher: Teacher | None = None, lr: float = TuneOptions.lr, epochs: int = 1, batch_size: int = 4,
                     seed: int = 0, threads: int | None = None, progress: bool = True,
                     history: list[float] | None = None,
                     on_epoch: Callable[[int, dict[str, torch.Tensor]], None] | None = None) -> dict[str, np.ndarray]:
    """Train only the routers (AdamW) on `tokens` [N, L]; returns the float32 weights by GGUF name.

    The runner's routers are updated after every step. `teacher` (rows aligned with `tokens`) is required
    for every loss but `ce`. Each step's loss is appended to `history` when given; `on_epoch(epoch,
    masters)` runs after every epoch with the float32 master weights (for held-out selection).
    """
    if loss not in LOSSES:
        raise GemqError(f"unknown router-tuning loss '{loss}'.", f"use one of: {', '.join(LOSSES)}.")
    if loss != "ce" and teacher is None:
        raise ValueError(f"{loss} needs the teacher's cached distributions (teacher_pass before quantizing)")
    masters = {n: v.requires_grad_(True) for n, v in runner.routers().items()}
    with _deterministic(seed, threads), runner.training():
        opt = torch.optim.AdamW(list(masters.values()), lr=lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        steps = [b for _ in range(epochs) for b in _batches(len(tokens), batch_size, torch.randperm(len(tokens), generator=gen))]
        per_epoch = len(steps) // epochs
        bar = _progress(steps, progress, f"router tuning ({loss})")
        for i, rows in enumerate(bar):
            value, grads = runner.step(tokens[rows], None if teacher is None else teacher.rows(rows), loss)
            for n, m in masters.items():
                m.grad = grads[n]  # `route` alone: no shexp grad
            opt.step()
            opt.zero_grad(set_to_none=True)
            runner.set_routers(masters)
            if history is not None:
                history.append(float(value.detach()))
            if progress:
                bar.set_postfix(loss=f"{float(value.detach()):.4f}")
            if on_epoch is not None and (i + 1) % per_epoch == 0:
                on_epoch((i + 1) // per_epoch, masters)
    return {n: m.detach().cpu().numpy().astype(np.float32) for n, m in masters.items()}


def _progress(items: list, enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="batch")


# -- the whole `--finetune-routers` step -----------------------------------------------------------

def split_rows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, held-out rows): 1 in 8 sequences (at least one) is held out to judge the tuning;
    with a single sequence both are that sequence."""
    if n < 2:
        return torch.arange(n), torch.arange(n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    n_val = max(1, n // 8)
    return order[n_val:].sort().values, order[:n_val].sort().values


def _curve(history: list[float], points: int = 20) -> list[float]:
    """The loss curve, averaged down to at most `points` values."""
    if not history:
        return []
    return [float(np.mean(c)) for c in np.array_split(np.asarray(history), min(points, len(history)))]


@dataclass
class RouterTuning:
    """Tuned routers by GGUF name (None: keep the file's own, no epoch beat them on held-out text), and
    the report section that says how they were judged."""

    routers: dict[str, np.ndarray] | None
    report: dict[str, Any]


def tune_quantized(runner: Runner, tokens: torch.Tensor, teacher: Teacher,
                   opts: TuneOptions = TuneOptions(), *, batch_size: int = 4, seed: int = 0,
                   progress: bool = True) -> RouterTuning:
    """Tune the routers of an already quantized model (`runner`: in memory or layer-streamed).

    Held-out sequences judge the tuning: KD and CE loss and routing shift per layer, before and after,
    plus the training loss curve. With `select="best"` the routers kept are those of the epoch with the
    lowest held-out KD, the untuned ones included (epoch 0): on the demo model, tuning that fits the
    calibration text can move the eval text away from full precision, and a tuning that makes things
    worse must not ship (then `routers` is None and the model keeps its original routers). `select="last"`
    keeps the last epoch's routers.
    """
    if opts.select not in SELECT:
        raise ValueError(f"select must be one of {SELECT}, not {opts.select!r}")
    t0 = time.perf_counter()
    train, val = split_rows(len(tokens), seed)
    val_teacher = teacher.rows(val)
    before = runner.score(tokens[val], val_teacher, batch_size)
    best = {"score": before, "epoch": 0, "routers": runner.routers()}
    heldout_kd = [before.kd]

    def judge(epoch: int, masters: dict[str, torch.Tensor]) -> None:
        s = runner.score(tokens[val], val_teacher, batch_size)
        heldout_kd.append(s.kd)
        if opts.select == "last" or s.kd < best["score"].kd:
            best.update(score=s, epoch=epoch, routers={n: m.detach().clone() for n, m in masters.items()})

    history: list[float] = []
    finetune_routers(runner, tokens[train], loss=opts.loss, teacher=teacher.rows(train), lr=opts.lr,
                     epochs=opts.epochs, batch_size=batch_size, seed=seed, progress=progress, history=history,
                     on_epoch=judge)
    runner.set_routers(best["routers"])
    after = best["score"]  # judged with exactly these routers in the model
    shipped = best["epoch"] > 0
    if not shipped:
        log.warning("router tuning did not lower the held-out KD (%.4f -> %s); keeping the original routers",
                    before.kd, ", ".join(f"{v:.4f}" for v in heldout_kd[1:]))
    section = {
        "loss": opts.loss, "lr": opts.lr, "epochs": opts.epochs, "batch_size": batch_size, "seed": seed,
        "steps": len(history), "select": opts.select, "kept_epoch": best["epoch"], "routers_shipped": shipped,
        "heldout_kd_per_epoch": heldout_kd, "train_sequences": len(train), "heldout_sequences": len(val),
        "teacher_top_k": int(teacher.logp.shape[-1]), "teacher_ce": teacher.ce, "train_loss_curve": _curve(history),
        "heldout": {"kd_before": before.kd, "kd_after": after.kd, "ce_before": before.ce, "ce_after": after.ce,
                    "route_before": before.route, "route_after": after.route},
        "routing_shift": {"mean_before": before.mean_shift, "mean_after": after.mean_shift,
                          "per_layer": {str(l): {"before": before.shift[l], "after": after.shift[l]} for l in before.shift}},
        "seconds": time.perf_counter() - t0,
    }
    routers = {n: m.cpu().numpy().astype(np.float32) for n, m in best["routers"].items()} if shipped else None
    return RouterTuning(routers, section)


def tune_for_plan(runner: Runner, tokens: torch.Tensor, plan: ExpertPlan, opts: TuneOptions = TuneOptions(), *,
                  seed: int = 0, progress: bool = True) -> RouterTuning:
    """Teacher pass, quantize the experts per `plan`, tune the routers. The runner's experts stay
    quantized afterwards."""
    teacher = runner.teacher_pass(tokens, progress=progress)
    runner.quantize(plan)
    return tune_quantized(runner, tokens, teacher, opts, seed=seed, progress=progress)
