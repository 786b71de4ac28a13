"""GEMQ costs: the predicted loss increase of quantizing each unit to each candidate ggml type.

c[l, e, t] = Σ_tokens Σ_d (w_e(x)·g_d)² (E_e(x) − E_e,q(x))_d², over the tokens routed
to expert e, with only that expert (or one of its projections) quantized to t by ggml's own
quantizer with the expert's imatrix: the exact bytes that will ship. Quantizing one expert does not
change the router's input, so this equals re-running the model with it quantized, read where calibration
takes g (the experts' output, or the block's where a shared expert joins it), without re-running it.

Units by granularity:
- 'expert': gate, up and down quantized together (the paper's choice). A type a projection's row
  width cannot take is replaced for that projection by llama.cpp's own fallback (`fitting_type`,
  e.g. Q4_K -> Q5_0 for 1408-wide rows), exactly what the writer will do; cost and bits use it.
- 'expert-proj': each projection alone, the others in full precision; a type must fit the rows.
- 'tensor': one type per layer-projection, cost = Σ over the layer's experts of the 'expert-proj'
  costs. This quantizes every expert of the tensor at once while each cost term assumes the other
  experts exact; since each routing slot of a token touches one expert, the cross terms only come
  from the other slots of the same token, so summing per-expert costs is the natural first-order
  approximation (exact when top-k = 1).
Experts never routed during calibration get, per type, the largest cost of a routed expert of the
same layer (a conservative default: they are assumed as sensitive as the layer's most sensitive
expert); they are listed in `CostTable.never_routed` and `notes`.
Quantization is the CPU hot spot: each distinct (matrix, effective type) is quantized once, in a
thread pool (ggml releases the GIL), one layer ahead of the cost arithmetic when the whole model is in
memory (a streamed model holds one layer: no look-ahead, `streaming.streamed_costs`); results go into the
writer's `QuantCache` when they fit `cache_limit` bytes, so the final write re-quantizes nothing.

Sampled rows (`rows` < 1, `--cost-rows`): ggml quantizes row by row (a row's bytes depend only on that
row and the per-column imatrix), so each candidate quantizes only a seeded sample of each matrix's rows;
the cost is that of the expert with only the sampled rows quantized (the others exact), times
rows/sampled. For down, whose rows are output coordinates, the cost is a sum over rows: the estimate is
exactly unbiased. A gate/up row is one intermediate channel; its error reaches every output through down,
so the cost is a quadratic form over channels: the diagonal (each channel's own error, gate's and up's
together: the two share their sample of channels) is estimated without bias, the cross terms between
channels (and, for a whole expert, between down's and gate/up's errors: products of independent
quantization errors, near zero on average) are shrunk by the fraction.
The partial matrices stay out of the caches: the writer quantizes the chosen type of each matrix in full.
The arithmetic runs on the sampled rows too (`experts_math.patched_delta`: down's sampled output rows,
gate/up's sampled channels through down's matching columns), so at fraction f it takes ~f of the dense
FLOPs per candidate, besides the expert's full-precision pass shared by all candidates; the value is the
same as with whole matrices whose unsampled rows are exact (float rounding aside). A post-expert norm
mixes all outputs, so families with one keep the whole-matrix arithmetic. `--cost-rows auto` (the default,
`cost_fraction`) samples only real-size experts, where the cost pass dominates a conversion; small
experts keep exact costs.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from ..allocate import AllocationProblem, UnitKey
from ..archs import ArchAdapter, ExpertsView
from ..errors import GemqError
from ..ggml.imatrix import expert_imatrix
from ..ggml.names import PROJS, expert_tensor_name, parse_expert_name
from ..ggml.quant import QuantCache, cpu_threads, dequantize, quantize
from ..ggml.types import fitting_type, type_info
from ..options import AUTO_COST_ROWS, AUTO_COST_ROWS_MIN, DEFAULT_TYPES
from ..plan import ExpertPlan
from .experts_math import ExpertPass, RowPatch, expert_delta, expert_fn, expert_pass, patched_delta
from .stats import CalibStats, LayerStats
from .units import Widths, effective_type, unit_bits, unit_keys

DEFAULT_CACHE_LIMIT = 2**30


@dataclass
class CostTable:
    """Costs and exact sizes of every (unit, type), in the shape `allocate.AllocationProblem` wants.

    cost[u, t] is np.inf where type t is not allowed for unit u (row width, or no imatrix for a type
    that needs one); bits[u, t] is exact (rows × row_bytes × 8 over the unit's matrices).
    """

    units: list[UnitKey]
    types: list[str]
    cost: np.ndarray
    params: np.ndarray
    bits: np.ndarray
    never_routed: list[tuple[int, int]]
    token_counts: dict[int, np.ndarray]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def problem(self) -> AllocationProblem:
        return AllocationProblem.build(self.units, self.types, self.cost, self.params, bits=self.bits)


# -- the arithmetic (pure) -------------------------------------------------------------------------

def weighted_sse(delta: torch.Tensor, gw: torch.Tensor) -> float:
    """Σ (gw ⊙ delta)²: the Fisher-weighted squared change of the block output."""
    return float(((gw * delta) ** 2).sum())


def patched_sse(base: ExpertPass, patches: dict[str, RowPatch], gw: torch.Tensor) -> float:
    """`weighted_sse` of the change with only the patched rows quantized, on the changed rows' FLOPs."""
    delta, out = patched_delta(base, patches)
    v = (gw if out is None else gw[:, out]) * delta
    return float(torch.dot(v.reshape(-1), v.reshape(-1)))


# -- quantization jobs -----------------------------------------------------------------------------

@dataclass
class _LayerJobs:
    """A layer's float expert weights and the pending quantizations of its matrices."""

    layer: int
    view: ExpertsView
    weights: list[dict[str, torch.Tensor]]            # per expert, on the model's device (views, no copies)
    eff: dict[str, dict[str, str | None]]            # proj -> candidate -> effective type
    futures: dict[tuple[str, int, str], Future]      # QuantCache key -> quantized bytes
    fallback: bool                                   # a type the rows cannot take becomes llama.cpp's fallback
    has_imatrix: dict[str, bool]                     # proj -> an imatrix exists (types that need one allowed)
    rows: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)  # (expert, proj) -> sampled rows


def check_cost_rows(rows: float | None) -> None:
    """A fraction in (0, 1], or None (`auto`)."""
    if rows is not None and not (np.isfinite(rows) and 0.0 < rows <= 1.0):
        raise GemqError(f"--cost-rows {rows:g} is not a fraction in (0, 1].",
                        "use e.g. --cost-rows 0.25 (1 = exact costs), or auto.")


def cost_fraction(requested: float | None, matrix_rows: Sequence[int]) -> float:
    """The fraction of rows the costs use: `requested`, or for `auto` (None) AUTO_COST_ROWS when every expert
    matrix (`matrix_rows`: their row counts) has at least AUTO_COST_ROWS_MIN rows, else 1. One fraction for
    all of an expert's matrices, so a unit's scale-up is the same for each of its terms."""
    if requested is not None:
        return requested
    return AUTO_COST_ROWS if min(matrix_rows) >= AUTO_COST_ROWS_MIN else 1.0


def sample_rows(n_rows: int, fraction: float, layer: int, expert: int, proj: str) -> np.ndarray | None:
    """The sorted rows of one matrix that a sampled cost quantizes (None: all of them); seeded by the
    matrix, so every candidate type, run and resumed pass sees the same rows. Gate and up share their
    sample (a row of each is one intermediate channel): a sampled channel carries its whole error, and the
    arithmetic touches f of the channels, not up to 2f."""
    if fraction >= 1.0:
        return None
    m = min(n_rows, max(1, round(fraction * n_rows)))
    which = "gate" if proj == "up" else proj
    rng = np.random.default_rng([layer, expert, PROJS.index(which) if which in PROJS else len(PROJS)])
    return np.sort(rng.choice(n_rows, size=m, replace=False))


def with_rows(w: torch.Tensor, rows: np.ndarray | None, wq_rows: torch.Tensor) -> torch.Tensor:
    """`w` with the sampled `rows` replaced by their quantized values (all of it when rows is None)."""
    if rows is None:
        return wq_rows
    out = w.clone()
    out[torch.from_numpy(rows)] = wq_rows
    return out


def sample_scale(shapes: Sequence[tuple[int, int]], rows: Sequence[np.ndarray | None]) -> float:
    """rows / sampled rows of a unit's matrices, weighted by their sizes (1 when not sampled)."""
    total = sum(r * c for r, c in shapes)
    return sum(r * c * (1.0 if s is None else r / len(s)) for (r, c), s in zip(shapes, rows)) / total


def _submit_layer(pool: ThreadPoolExecutor, view: ExpertsView, layer: int, types: Sequence[str],
                  means: dict[str, np.ndarray] | None, fallback: bool, cache: QuantCache,
                  fraction: float = 1.0) -> _LayerJobs:
    n_experts, projs = view.n_experts, view.projs
    weights = [{p: w.detach() for p, w in view.weights(e).items()} for e in range(n_experts)]
    imat = {p: expert_imatrix(means, layer, p, n_experts) if means else None for p in projs}
    eff = {p: {t: effective_type(t, weights[0][p].shape[1], fallback, imat[p] is not None) for t in types}
           for p in projs}
    futures: dict[tuple[str, int, str], Future] = {}
    rows: dict[tuple[int, str], np.ndarray] = {}
    for e in range(n_experts):
        for p in projs:
            name = expert_tensor_name(layer, p)
            idx = sample_rows(weights[e][p].shape[0], fraction, layer, e, p)
            if idx is not None:
                rows[(e, p)] = idx
            w = _host_rows(weights[e][p], idx)
            for et in {v for v in eff[p].values() if v is not None}:
                key = (name, e, et)
                if key in cache:  # ggml's rows are independent: the sampled rows of a full matrix are the same bytes
                    futures[key] = _done(cache[key] if idx is None else np.ascontiguousarray(cache[key][idx]))
                else:
                    im = None if imat[p] is None else imat[p][e]
                    futures[key] = pool.submit(quantize, w, et, im, 1)
    return _LayerJobs(layer, view, weights, eff, futures, fallback, {p: imat[p] is not None for p in projs}, rows)


def _host_rows(w: torch.Tensor, idx: np.ndarray | None) -> np.ndarray:
    """float32 rows for ggml's quantizer (the sampled ones, or all): only these are copied to the host, so
    on a GPU the layer is not held twice (measured at Qwen3-30B shapes: 9.8 GiB of host memory otherwise)."""
    rows = w if idx is None else w[torch.from_numpy(idx).to(w.device)]
    return np.ascontiguousarray(rows.to("cpu", torch.float32).numpy())


def _done(value: np.ndarray) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def _layer_jobs(pool: ThreadPoolExecutor, model: nn.Module, adapter: ArchAdapter, layers: Sequence[int],
                types: Sequence[str], means: dict[str, np.ndarray] | None, fallback: bool,
                cache: QuantCache, fraction: float = 1.0, ahead: bool = True) -> Iterator[_LayerJobs]:
    """Yield each layer's jobs; `ahead`: while the next layer's quantizations are already queued (the whole
    model in memory), else each layer's weights are let go before the next layer is asked for (streamed:
    one layer held)."""
    def submit(l: int) -> _LayerJobs:
        return _submit_layer(pool, adapter.experts(adapter.moe_block(model, l)), l, types, means, fallback, cache,
                             fraction)
    if not ahead:
        for l in layers:
            jobs = submit(l)
            yield jobs
            jobs.weights.clear()  # the consumer (or a progress bar) may still hold `jobs` while the next loads
            jobs.futures.clear()
        return
    pending = submit(layers[0]) if layers else None
    for i in range(len(layers)):
        current = pending
        pending = submit(layers[i + 1]) if i + 1 < len(layers) else None
        yield current


# -- per-layer costs -------------------------------------------------------------------------------

def _expert_costs(jobs: _LayerJobs, s: LayerStats, e: int, types: Sequence[str], granularity: str,
                  device: torch.device, dtype: torch.dtype) -> np.ndarray:
    """Costs of one routed expert: [T] for 'expert', [projections, T] otherwise."""
    tok, rw = s.routed(e)
    x, rw = s.x[tok].to(device, dtype), rw.to(device, dtype)[:, None]
    g = s.g[tok].to(device, dtype)
    x, gw = (x * rw, g) if jobs.view.input_weighted else (x, g * rw)  # E(w x) or w E(x)
    projs = jobs.view.projs
    w = {p: jobs.weights[e][p].to(device, dtype) for p in projs}
    base = expert_pass(x, w, expert_fn(jobs.view, e, device, dtype))
    rows = {p: jobs.rows.get((e, p)) for p in projs}
    patched = base.fn.finish is None and all(r is not None for r in rows.values())  # sampled: rows only
    deq: dict[tuple[str, str], torch.Tensor] = {}

    def wq(p: str, et: str) -> torch.Tensor:
        """The quantized matrix, or when `patched` only its sampled rows."""
        if (p, et) not in deq:
            data = jobs.futures[(expert_tensor_name(jobs.layer, p), e, et)].result()
            q = torch.from_numpy(dequantize(data, et, w[p].shape[1])).to(device, dtype)
            deq[(p, et)] = q if patched else with_rows(w[p], rows[p], q)
        return deq[(p, et)]

    memo: dict[tuple, float] = {}

    def cost(combo: tuple[tuple[str, str], ...]) -> float:
        if combo not in memo:
            scale = sample_scale([tuple(w[p].shape) for p, _ in combo], [rows[p] for p, _ in combo])
            if patched:
                memo[combo] = scale * patched_sse(base, {p: RowPatch(torch.from_numpy(rows[p]).to(device), wq(p, et))
                                                          for p, et in combo}, gw)
            else:
                memo[combo] = scale * weighted_sse(expert_delta(base, {p: wq(p, et) for p, et in combo}), gw)
        return memo[combo]

    if granularity == "expert":
        out = np.full(len(types), np.inf)
        for j, t in enumerate(types):
            combo = tuple((p, jobs.eff[p][t]) for p in projs)
            if all(et is not None for _, et in combo):
                out[j] = cost(combo)
        return out
    out = np.full((len(projs), len(types)), np.inf)
    for i, p in enumerate(projs):
        for j, t in enumerate(types):
            et = jobs.eff[p][t]
            if et is not None:
                out[i, j] = cost(((p, et),))
    return out


def _fill_never_routed(c: np.ndarray, routed: np.ndarray) -> np.ndarray:
    """Unrouted experts' costs := the layer's largest routed cost per (projection,) type."""
    if routed.all() or not routed.any():
        return c
    c = c.copy()
    c[~routed] = c[routed].max(axis=0)
    return c


def _widths(jobs: _LayerJobs) -> Widths:
    return {p: jobs.weights[0][p].shape for p in jobs.view.projs}


def _unit_bits(jobs: _LayerJobs, projs: Sequence[str], types: Sequence[str], n: int = 1) -> np.ndarray:
    """Bits of a unit made of `projs` (x n experts) for every type; nominal bpw where not allowed."""
    return unit_bits(_widths(jobs), projs, types, n, jobs.fallback, jobs.has_imatrix)[0]


def _keep(cache: QuantCache, jobs: _LayerJobs, keep: bool) -> None:
    if keep:
        for key, f in jobs.futures.items():
            cache[key] = f.result()


def _quant_bytes(adapter: ArchAdapter, model: nn.Module, layers: Sequence[int], n_experts: int,
                 types: Sequence[str], fallback: bool) -> int:
    """Bytes that caching every quantized matrix would hold (all MoE layers share one shape)."""
    if not layers:
        return 0
    w = adapter.experts(adapter.moe_block(model, layers[0])).weights(0)
    per_expert = 0
    for p in w:
        rows, width = w[p].shape
        ets = {fitting_type(t, width) if fallback else type_info(t).name for t in types}
        per_expert += sum(rows * type_info(et).row_bytes(width) for et in ets if type_info(et).fits(width))
    return per_expert * n_experts * len(layers)


@dataclass
class LayerCosts:
    """One MoE layer's rows of the cost table: what an interrupted cost pass keeps, layer by layer."""

    layer: int
    cost: np.ndarray          # [units of the layer, T]
    bits: np.ndarray          # [units of the layer, T]
    params: np.ndarray        # [units of the layer]
    never_routed: list[int]   # experts of the layer no calibration token chose
    token_counts: np.ndarray  # [E] int64
    notes: list[str] = field(default_factory=list)


class LayerStore(Protocol):
    """Where finished layers go (gemq.cache): `load` returns a layer finished by an earlier, maybe
    interrupted, pass; `save` gets each new layer with its quantized candidates."""

    def load(self, layer: int) -> LayerCosts | None: ...

    def save(self, rec: LayerCosts, quantized: QuantCache) -> None: ...


def assemble_table(recs: Sequence[LayerCosts], n_experts: int, projs: tuple[str, ...], types: Sequence[str],
                   granularity: str, kept: bool, seconds: float = 0.0) -> CostTable:
    """The cost table from its layers (in order), with the notes that span layers."""
    layers = [r.layer for r in recs]
    units = unit_keys(layers, n_experts, granularity, projs)
    never = [(r.layer, e) for r in recs for e in r.never_routed]
    notes = [n for r in recs for n in r.notes]
    if never:
        what = "do not count in the tensor sums" if granularity == "tensor" else \
            "got their layer's largest routed cost per type (conservative default)"
        notes.append(f"{len(never)} experts were never routed during calibration and {what}: "
                     + ", ".join(f"L{l}.E{e}" for l, e in never))
    if not kept:
        notes.append("quantized experts were not cached (no cache given, or over the cache limit); "
                     "the writer quantizes the chosen types again")
    cost = np.concatenate([r.cost for r in recs]).reshape(len(units), len(types))
    return CostTable(units=units, types=list(types), cost=cost,
                     params=np.concatenate([r.params for r in recs]).astype(np.float64),
                     bits=np.concatenate([r.bits for r in recs]).reshape(len(units), len(types)), never_routed=never,
                     token_counts={r.layer: r.token_counts for r in recs}, notes=notes, seconds=seconds)


def _layer_costs(jobs: _LayerJobs, s: LayerStats, types: Sequence[str], granularity: str,
                 device: torch.device, dtype: torch.dtype) -> LayerCosts:
    """One layer's cost rows, bits and sizes from its quantization jobs and calibration record."""
    projs, n_experts = jobs.view.projs, jobs.view.n_experts
    routed = s.counts.numpy() > 0
    per_expert = np.stack([
        _expert_costs(jobs, s, e, types, granularity, device, dtype) if routed[e]
        else np.zeros((len(types),) if granularity == "expert" else (len(projs), len(types)))
        for e in range(n_experts)])
    if granularity == "tensor":
        cost = per_expert.sum(axis=0)
        bits = [_unit_bits(jobs, (p,), types, n_experts) for p in projs]
        params = [n_experts * jobs.weights[0][p].numel() for p in projs]
    elif granularity == "expert":
        cost = _fill_never_routed(per_expert, routed)
        bits = [_unit_bits(jobs, projs, types)] * n_experts
        params = [sum(jobs.weights[0][p].numel() for p in projs)] * n_experts
    else:
        cost = _fill_never_routed(per_expert, routed).reshape(-1, len(types))
        bits = [_unit_bits(jobs, (p,), types) for _ in range(n_experts) for p in projs]
        params = [jobs.weights[0][p].numel() for _ in range(n_experts) for p in projs]
    return LayerCosts(layer=jobs.layer, cost=np.asarray(cost, dtype=np.float64).reshape(-1, len(types)),
                      bits=np.stack(bits), params=np.asarray(params, dtype=np.float64),
                      never_routed=np.flatnonzero(~routed).tolist(), token_counts=s.counts.numpy().copy(),
                      notes=_layer_notes(jobs, types, jobs.fallback))


def estimate_costs(model: nn.Module, adapter: ArchAdapter, stats: CalibStats,
                   imatrix: dict[str, np.ndarray] | None, *, types: Sequence[str] = DEFAULT_TYPES,
                   granularity: str = "expert", cache: QuantCache | None = None,
                   cache_limit: int = DEFAULT_CACHE_LIMIT, device: str | torch.device | None = None,
                   dtype: torch.dtype = torch.float32, threads: int | None = None,
                   store: LayerStore | None = None, progress: bool = False, rows: float = 1.0,
                   ahead: bool = True) -> CostTable:
    """The GEMQ cost table of every unit and candidate type.

    imatrix: per-matrix means keyed by GGUF name ([E, n_in] for expert tensors), e.g.
    `stats.imatrix().means()` or `read_imatrix(path).means()`; None quantizes without one (types that
    need one are then not allowed). `cache`: the writer's QuantCache, filled with every quantized
    matrix when they all fit `cache_limit` bytes (existing entries are reused, never recomputed).
    `store`: layers finished earlier are taken from it, and each new layer goes to it with its
    quantized candidates (which then stay out of `cache`: the store hands them to the writer).
    `rows` < 1: costs estimated from that fraction of each matrix's rows (module docstring); the partial
    candidates go to neither `cache` nor `store`. `ahead=False` (a layer-streamed model): no look-ahead,
    so one layer's weights are held, not two.
    """
    t0 = time.perf_counter()
    shape = adapter.moe_shape(model.config)
    layers = [l for l in shape.moe_layers if l in stats.layers]
    missing = sorted(set(shape.moe_layers) - set(stats.layers))
    if missing:
        raise GemqError(f"calibration statistics lack MoE layers {missing}.", "collect stats on the same model.")
    types = [type_info(t).name for t in types]
    fallback = granularity == "expert"
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_cost_rows(rows)
    done = {l: r for l in layers if store is not None and (r := store.load(l)) is not None}
    todo = [l for l in layers if l not in done]
    keep = store is None and cache is not None and rows >= 1.0 and \
        _quant_bytes(adapter, model, layers, shape.n_experts, types, fallback) <= cache_limit
    cache = {} if cache is None else cache
    with ThreadPoolExecutor(threads or cpu_threads()) as pool:
        it = _layer_jobs(pool, model, adapter, todo, types, imatrix, fallback, cache, rows, ahead)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, total=len(todo), desc="GEMQ costs", unit="layer")
        for jobs in it:
            rec = _layer_costs(jobs, stats.layers[jobs.layer], types, granularity, device, dtype)
            if store is not None:
                store.save(rec, {key: f.result() for key, f in jobs.futures.items()} if rows >= 1.0 else {})
            _keep(cache, jobs, keep)
            done[jobs.layer] = rec
    return assemble_table([done[l] for l in layers], shape.n_experts, shape.projs, types, granularity,
                          kept=keep or (store is not None and rows >= 1.0), seconds=time.perf_counter() - t0)


def _layer_notes(jobs: _LayerJobs, types: Sequence[str], fallback: bool) -> list[str]:
    notes = []
    for p in jobs.view.projs:
        width = jobs.weights[0][p].shape[1]
        for t in types:
            et = jobs.eff[p][t]
            if et is None:
                notes.append(f"L{jobs.layer}.{p}: {t} not allowed (rows {width} wide"
                             f"{', or no imatrix' if type_info(t).requires_imatrix else ''})")
            elif et != t and fallback:
                notes.append(f"L{jobs.layer}.{p}: {t} becomes {et} for rows {width} wide (llama.cpp's fallback)")
    return notes


def prune_cache(cache: QuantCache, plan: ExpertPlan) -> None:
    """Drop cached matrices the plan does not use, before the write (frees the other types' bytes)."""
    for key in list(cache):
        name, e, et = key
        parsed = parse_expert_name(name)
        planned = plan.get(parsed) if parsed else None
        width = cache[key].shape[1] // type_info(et).type_size * type_info(et).block_size
        if planned is None or fitting_type(planned[e], width) != et:
            del cache[key]
