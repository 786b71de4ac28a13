"""Stage 2 of a conversion: float GGUF -> typed GGUF, one tensor at a time.

Every tensor gets its planned type through ggml's own quantizer. Routed-expert tensors whose experts
have different types are written in the grouped layout of docs/gguf-layout.md; uniform ones keep the
stock name, so a file without mixed projections is a plain llama.cpp file. Experts are renumbered
group by group (router rows and every per-expert tensor alike, so the model is unchanged): the
patched CUDA runtime then finds an expert's group by comparing its index with the group bounds
instead of reading the map, which costs a memory latency per thread block of the decode kernels.
The source is memory-mapped (bf16 stays bf16 until one expert's rows are quantized) and the output
streamed: peak memory is about one expert tensor, whatever the model's size. The file appears under its
final name only when complete.
"""
from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from gguf import (
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    Keys,
    LlamaFileType,
)
from tqdm import tqdm

from ..errors import GemqError
from ..ggml.layout import expert_qmap, group_major_order, group_tensor_name, qmap_name
from ..ggml.names import EXPERT_AXIS_RE, expert_tensor_name, parse_expert_name
from ..ggml.quant import QuantCache, cpu_threads, quantize, widen_bf16
from ..ggml.types import fitting_type, type_info
from ..plan import ExpertPlan, PlanOrigin
from ..policy import TensorPolicy

GEMQ_VERSION = 1
log = logging.getLogger("gemq")

# the projection whose groups must be contiguous first (gate_up/gate and up share a fused decode kernel)
_ORDER_PROJS = ("gate_up", "gate", "up", "down")


@dataclass
class _Out:
    """One output tensor: its info, and how to produce its bytes when its turn comes."""

    name: str
    type_name: str
    byte_shape: tuple[int, ...]
    n_params: int
    make: Callable[[], np.ndarray]
    expert: bool = False

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.byte_shape)) * (4 if self.type_name == "I32" else 1)


@dataclass
class WriteSummary:
    """What was written: the numbers llama.cpp users compare."""

    path: str
    file_bytes: int
    total_params: int
    tensor_bytes: int
    expert_params: int
    expert_bytes: int
    grouped: int
    type_counts: dict[str, int] = field(default_factory=dict)
    expert_type_counts: dict[str, int] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)

    @property
    def file_bpw(self) -> float:
        return 8.0 * self.tensor_bytes / max(self.total_params, 1)

    @property
    def expert_bpw(self) -> float:
        return 8.0 * self.expert_bytes / max(self.expert_params, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "file_bytes": self.file_bytes, "file_gib": self.file_bytes / 2**30,
                "file_bpw": self.file_bpw, "expert_bpw": self.expert_bpw, "total_params": self.total_params,
                "expert_params": self.expert_params, "grouped_projections": self.grouped,
                "tensor_type_counts": self.type_counts, "expert_matrix_type_counts": self.expert_type_counts,
                "fallbacks": self.fallbacks}


def copy_metadata(reader: GGUFReader, writer: GGUFWriter, skip: frozenset[str] | set[str] = frozenset()) -> None:
    """Every key of `reader` but the architecture (the writer sets it) and `skip`, with its exact value type."""
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name in skip or f.name == Keys.General.ARCHITECTURE:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)


def _add_gemq_metadata(writer: GGUFWriter, origin: PlanOrigin, summary_counts: Counter, grouped: int,
                       expert_bpw: float, routers_tuned: bool, orders: dict[int, list[int]]) -> None:
    writer.add_uint32("gemq.version", GEMQ_VERSION)
    if origin.budget is not None:
        writer.add_float32("gemq.budget", float(origin.budget))
    writer.add_string("gemq.strategy", origin.strategy)
    writer.add_string("gemq.granularity", origin.granularity)
    if origin.candidate_types:
        writer.add_array("gemq.candidate_types", list(origin.candidate_types))
    writer.add_float32("gemq.expert_bpw", float(expert_bpw))
    writer.add_string("gemq.type_counts", json.dumps(dict(sorted(summary_counts.items()))))
    writer.add_uint32("gemq.grouped_tensors", grouped)
    writer.add_bool("gemq.routers_tuned", routers_tuned)
    if orders:
        writer.add_string("gemq.expert_order", json.dumps({str(l): o for l, o in sorted(orders.items())}))


class _Planner:
    """Turns source tensors into output tensors (names, types, byte shapes, lazy bytes)."""

    def __init__(self, plan: ExpertPlan, policy: TensorPolicy, imatrix: dict[str, np.ndarray] | None,
                 routers: dict[str, np.ndarray] | None, strict_plan: bool, cache: QuantCache | None,
                 tensor_types: Mapping[str, str] | None = None) -> None:
        self.plan, self.policy, self.imatrix = plan, policy, imatrix or {}
        self.tensor_types = dict(tensor_types or {})
        self.routers, self.strict, self.cache = routers or {}, strict_plan, cache if cache is not None else {}
        self.fitted: dict[tuple[int, str], list[str]] = {}  # (layer, proj) -> each expert's type as written
        self.orders: dict[int, list[int]] = {}  # set by fit_experts_and_order
        self.fallbacks: list[str] = []
        self.expert_counts: Counter = Counter()
        self.grouped = 0

    def _fit(self, name: str, requested: str, width: int, strict: bool) -> str:
        t = fitting_type(requested, width)
        if t != type_info(requested).name:
            if strict:
                raise GemqError(f"{name}: {requested} needs rows whose width is a multiple of "
                                f"{type_info(requested).block_size}, but its rows are {width} wide.",
                                f"choose a type that fits these rows (llama.cpp would fall back to {t}).")
            msg = f"{name}: rows {width} wide cannot be {requested}; using {t} (as llama-quantize does)"
            log.warning(msg)
            self.fallbacks.append(msg)
        return t

    def plain(self, name: str, data: np.ndarray) -> _Out:
        rows = data.reshape(-1, data.shape[-1]) if data.ndim > 1 else data.reshape(1, -1)
        if name in self.routers:
            new = np.asarray(self.routers[name], dtype=np.float32)
            if new.shape != data.shape:
                raise ValueError(f"router {name}: tuned shape {new.shape} != {data.shape}")
            rows = new.reshape(rows.shape)
        m = EXPERT_AXIS_RE.match(name)
        order = self.orders.get(int(m.group(1))) if m else None
        if order is not None:
            n = next((d for d in data.shape if d != 1), 1)  # ERNIE's selection bias is [1, n_experts]
            if n != len(order):
                raise ValueError(f"{name}: {n} rows on the expert axis, the layer has {len(order)} experts")
            rows = np.asarray(rows).reshape(len(order), -1)[order].reshape(rows.shape)
        want = self.tensor_types.get(name) or self.policy.type_for(name, data.ndim)
        t = self._fit(name, want, rows.shape[1], strict=False)
        imat = self.imatrix.get(name)
        nbytes_row = type_info(t).row_bytes(rows.shape[1])
        byte_shape = (*data.shape[:-1], nbytes_row) if data.ndim > 1 else (nbytes_row,)

        def make() -> np.ndarray:
            q = quantize(_floats(rows), t, None if imat is None else imat.reshape(-1))
            return q.reshape(byte_shape)
        return _Out(name, t, byte_shape, int(data.size), make)

    def _group_bytes(self, name: str, data: np.ndarray, members: list[int], t: str) -> np.ndarray:
        """The experts `members` of `name` quantized to `t`, stacked. Those not in the cache are quantized
        side by side, an expert a thread: one matrix's row chunks (24 for 768 rows) leave most of a many-core
        machine idle, and the bf16 widening of each expert runs in its own thread too. The cache is not
        thread-safe, so it is filled afterwards, in order (a store persists what it is given)."""
        imat = self._expert_imatrix(name)
        per_expert = imat is not None and imat.size == data.shape[0] * data.shape[2]
        todo = [e for e in members if (name, e, t) not in self.cache]
        workers = cpu_threads()
        threads = max(1, workers // max(len(todo), 1))  # a lone expert still gets every core

        def one(e: int) -> np.ndarray:
            im = None if imat is None else imat.reshape(data.shape[0], -1)[e] if per_expert else imat.reshape(-1)
            return quantize(_floats(data[e]), t, im, threads)
        with ThreadPoolExecutor(min(workers, max(len(todo), 1))) as pool:
            for e, q in zip(todo, pool.map(one, todo)):
                self.cache[(name, e, t)] = q
        return np.stack([self.cache.pop((name, e, t)) for e in members])

    def _plan_types(self, name: str, layer: int, proj: str) -> list[str]:
        """The plan's types for one expert tensor; a merged gate/up tensor (`ffn_gate_up_exps`) takes the
        gate's, which must be the up's too (one type per expert row block)."""
        try:
            if proj != "gate_up":
                return self.plan[(layer, proj)]
            gate, up = self.plan[(layer, "gate")], self.plan[(layer, "up")]
        except KeyError:
            raise GemqError(f"the plan has no types for {name}.", "give every MoE layer a type (see --plan).") from None
        if list(gate) != list(up):
            raise GemqError(f"{name} stores gate and up merged, and the plan types them differently.",
                            "give gate and up one type per expert (--granularity expert or tensor).")
        return gate

    def _expert_imatrix(self, name: str) -> np.ndarray | None:
        """The importance of an expert tensor's inputs; a merged gate/up reads the gate's input (the same)."""
        imat = self.imatrix.get(name)
        parsed = parse_expert_name(name)
        if imat is None and parsed is not None and parsed[1] == "gate_up":
            imat = self.imatrix.get(expert_tensor_name(parsed[0], "gate"))
        return imat

    def fit_experts_and_order(self, reader: GGUFReader, n_routing_groups: int) -> None:
        """Check the plan against every expert tensor and fit its types to the rows, before anything is
        written (so a bad plan fails first), then number each layer's experts group by group."""
        for t in reader.tensors:
            parsed = parse_expert_name(t.name)
            if parsed is None:
                continue
            layer, proj = parsed
            n_exp, n_in = int(t.shape[-1]), int(t.shape[0])  # ggml order: (n_in, n_out, n_exp)
            types = self._plan_types(t.name, layer, proj)
            if len(types) != n_exp:
                raise GemqError(f"the plan gives {len(types)} types for {t.name}, which has {n_exp} experts.",
                                "make the plan match the model.")
            fitted = [self._fit(f"{t.name} expert {e}", x, n_in, self.strict) for e, x in enumerate(types)]
            self.fitted[(layer, proj)] = fitted
            self.expert_counts.update(fitted)
        self.orders = _expert_orders(self.fitted, n_routing_groups)

    def experts(self, name: str, data: np.ndarray, layer: int, proj: str) -> list[_Out]:
        n_exp, n_out, n_in = data.shape
        types = self.fitted[(layer, proj)]
        groups = sorted(set(types), key=lambda t: type_info(t).id)
        order = self.orders.get(layer, list(range(n_exp)))  # members are old ids, listed in new order
        if len(groups) == 1:
            names = [(name, groups[0], order)]
        else:
            self.grouped += 1
            names = [(group_tensor_name(name, g), t, [e for e in order if types[e] == t]) for g, t in enumerate(groups)]
        outs = []
        for out_name, t, members in names:
            row_bytes = type_info(t).row_bytes(n_in)

            def make(members: list[int] = members, t: str = t) -> np.ndarray:
                return self._group_bytes(name, data, members, t)
            outs.append(_Out(out_name, t, (len(members), n_out, row_bytes), len(members) * n_out * n_in, make, True))
        if len(groups) > 1:
            new_id = np.argsort(order)
            qmap = expert_qmap([new_id[members] for _, _, members in names], n_exp)
            outs.append(_Out(qmap_name(name), "I32", qmap.shape, 0, lambda q=qmap: q))
        return outs


def write_gguf(src: Path, dst: Path, plan: ExpertPlan, policy: TensorPolicy, *,
               imatrix: dict[str, np.ndarray] | None = None, routers: dict[str, np.ndarray] | None = None,
               origin: PlanOrigin = PlanOrigin("uniform", "tensor"), strict_plan: bool = False,
               quant_cache: QuantCache | None = None, progress: bool = True,
               tensor_types: Mapping[str, str] | None = None, max_bytes: int | None = None) -> WriteSummary:
    """Write `dst` from the float GGUF `src` with every tensor typed by `plan` (experts), `tensor_types`
    (non-expert tensors a whole-file allocation decided: they win over the policy) and `policy`.
    `max_bytes` (--target-size): a file larger than this is removed and the run fails."""
    reader = GGUFReader(src)
    arch = str(reader.fields[Keys.General.ARCHITECTURE].contents())
    field = reader.fields.get(Keys.LLM.EXPERT_GROUP_COUNT.format(arch=arch))
    unknown = sorted(set(tensor_types or {}) - {t.name for t in reader.tensors})
    if unknown:
        raise GemqError(f"the plan types tensors the model does not have: {', '.join(unknown[:3])}.",
                        "use a plan written for this model.")
    planner = _Planner(plan, policy, imatrix, routers, strict_plan, quant_cache, tensor_types)
    planner.fit_experts_and_order(reader, int(field.contents()) if field is not None else 1)
    outs: list[_Out] = []
    for t in reader.tensors:
        data = t.data  # memory-mapped, numpy order (reversed ggml ne)
        if t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            raise GemqError(f"{src} holds {t.name} as {t.tensor_type.name}; re-typing needs float tensors.",
                            "convert from the Hugging Face checkpoint (or a F32/F16/BF16 GGUF).")
        if t.tensor_type == GGMLQuantizationType.BF16:
            data = data.view(np.uint16)  # still the mapping: widened one expert (or tensor) at a time, in make()
        parsed = parse_expert_name(t.name)
        outs.extend(planner.experts(t.name, data, *parsed) if parsed else [planner.plain(t.name, data)])

    counts = Counter(o.type_name for o in outs)
    expert_params = sum(o.n_params for o in outs if o.expert)
    expert_bytes = sum(o.nbytes for o in outs if o.expert)
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        writer = GGUFWriter(tmp, arch)
        copy_metadata(reader, writer, skip={Keys.General.FILE_TYPE} | {k for k in reader.fields if k.startswith("gemq.")})
        writer.add_file_type(LlamaFileType.GUESSED)
        _add_gemq_metadata(writer, origin, planner.expert_counts, planner.grouped,
                           8.0 * expert_bytes / max(expert_params, 1), bool(routers), planner.orders)
        for o in outs:
            dtype = np.int32 if o.type_name == "I32" else np.uint8
            raw = None if o.type_name == "I32" else GGMLQuantizationType[o.type_name]
            writer.add_tensor_info(o.name, o.byte_shape, np.dtype(dtype), o.nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=sum(o.nbytes for o in outs), unit="B", unit_scale=True, desc="quantize+write",
                  disable=not progress) as bar:
            for o in outs:
                arr = o.make()
                if arr.nbytes != o.nbytes:
                    raise AssertionError(f"{o.name}: produced {arr.nbytes} bytes, planned {o.nbytes}")
                writer.write_tensor_data(arr)
                _drop_mapped_pages(reader)
                bar.update(o.nbytes)
        writer.close()
        size = tmp.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise GemqError(f"the written file would take {size:,} bytes, over the target of {max_bytes:,}; "
                            "it was removed.", "report this as a bug (the size bound missed something).")
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):  # keep the original error
            tmp.unlink(missing_ok=True)
        raise
    return WriteSummary(path=str(dst), file_bytes=dst.stat().st_size, total_params=sum(o.n_params for o in outs),
                        tensor_bytes=sum(o.nbytes for o in outs if o.type_name != "I32"),
                        expert_params=expert_params, expert_bytes=expert_bytes, grouped=planner.grouped,
                        type_counts=dict(counts), expert_type_counts=dict(planner.expert_counts),
                        fallbacks=planner.fallbacks)


def _drop_mapped_pages(reader: GGUFReader) -> None:
    """Unmap the source pages read so far: they stay in the page cache, but no longer count in this process's
    RSS, which would otherwise grow to the whole float GGUF's size (memory users see as held by the run)."""
    mm = getattr(reader.data, "_mmap", None)  # numpy.memmap's mapping
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def _floats(a: np.ndarray) -> np.ndarray:
    """float32 rows for the quantizer; bf16 arrives as its uint16 bit patterns (the memory-mapped source)."""
    return widen_bf16(a) if a.dtype == np.uint16 else np.asarray(a, dtype=np.float32)


def _expert_orders(fitted: dict[tuple[int, str], list[str]], n_routing_groups: int) -> dict[int, list[int]]:
    """The layers whose experts get renumbered (group_major_order), from each expert's fitted type."""
    by_layer: dict[int, dict[str, list[str]]] = {}
    for (layer, proj), types in fitted.items():
        by_layer.setdefault(layer, {})[proj] = types
    orders = {}
    for layer, by_proj in by_layer.items():
        order = group_major_order([by_proj[p] for p in _ORDER_PROJS if p in by_proj], n_routing_groups)
        if order != sorted(order):
            orders[layer] = order
    return orders
