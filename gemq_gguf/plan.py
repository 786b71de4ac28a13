"""Expert plans: the ggml type of every routed expert matrix, keyed by (layer, projection).

A plan is what the allocation decides and what the writer consumes. On disk it is the `units` list
that allocation reports also carry, so an allocation's JSON can be fed back with `--plan`:

    {"units": [{"layer": 0, "expert": 3, "proj": null, "type": "Q4_K"}, ...]}

`expert: null` means every expert of that layer, `proj: null` every projection (gate, up, down).
Later units override earlier ones, so a plan can set a layer default and then single experts.
A whole-file allocation's report also has a `tensors` list (the non-expert tensors it typed), which a
plan may carry too; those types win over the policy:

    {"tensors": [{"name": "blk.0.attn_q.weight", "type": "Q5_K"}, ...]}
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .allocate import Allocation
from .errors import GemqError
from .ggml.names import PROJS
from .ggml.quant import QuantCache
from .ggml.types import canonical

ExpertPlan = dict[tuple[int, str], list[str]]


@dataclass(frozen=True)
class PlanOrigin:
    """How a plan was made: recorded in the file's `gemq.*` keys and in the report."""

    strategy: str                       # gemq | layerwise | uniform | plan
    granularity: str                    # expert | expert-proj | tensor
    budget: float | None = None
    candidate_types: tuple[str, ...] = ()


@dataclass
class ExpertTypes:
    """The expert-typing step's result, whatever made it: the plan and everything the writer and the
    report need from the step (imatrix, already quantized bytes, tuned routers, report sections)."""

    plan: ExpertPlan
    origin: PlanOrigin
    report: dict[str, Any] = field(default_factory=dict)
    imatrix: dict[str, np.ndarray] | None = None
    quant_cache: QuantCache = field(default_factory=dict)
    routers: dict[str, np.ndarray] | None = None
    tensor_types: dict[str, str] = field(default_factory=dict)  # GGUF name -> type, over the policy


def uniform_plan(layers: list[int], n_experts: int, type_name: str, projs: tuple[str, ...] = PROJS) -> ExpertPlan:
    """Every routed expert of every MoE layer gets one type."""
    t = canonical(type_name)
    return {(l, p): [t] * n_experts for l in layers for p in projs}


def _unit(i: int, u: Any) -> tuple[int, int | None, str | None, str]:
    """(layer, expert, proj, type) of unit #i, with JSON types checked (no silent int('3') or True)."""
    fix = "write units like {\"layer\": 0, \"expert\": 3, \"proj\": null, \"type\": \"Q4_K\"}."
    if not isinstance(u, dict) or "layer" not in u or "type" not in u:
        raise GemqError(f"plan unit #{i} ({u}) is not {{layer, expert, proj, type}}.", fix)
    layer, expert, proj, t = u["layer"], u.get("expert"), u.get("proj"), u["type"]
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    for key, value, ok in (("layer", layer, is_int(layer)), ("expert", expert, expert is None or is_int(expert)),
                           ("proj", proj, proj is None or isinstance(proj, str)), ("type", t, isinstance(t, str))):
        if not ok:
            want = {"layer": "an integer", "expert": "an integer or null", "proj": "a string or null",
                    "type": "a string"}[key]
            raise GemqError(f"plan unit #{i}: '{key}' is {json.dumps(value)}, not {want}.", fix)
    return layer, expert, proj, t


def plan_from_units(units: list[dict], layers: list[int], n_experts: int, projs: tuple[str, ...] = PROJS) -> ExpertPlan:
    """Resolve a `units` list against the model; every expert matrix must end up with a type.
    A later unit may refine an earlier, wider one; the same (layer, expert, proj) twice is an error."""
    plan: dict[tuple[int, str], list[str | None]] = {(l, p): [None] * n_experts for l in layers for p in projs}
    seen: dict[tuple[int, int | None, str | None], int] = {}
    for i, u in enumerate(units):
        layer, expert, proj, t = _unit(i, u)
        if (layer, expert, proj) in seen:
            raise GemqError(f"plan units #{seen[layer, expert, proj]} and #{i} both set layer {layer}, expert "
                            f"{expert}, proj {proj}.", "keep one unit per (layer, expert, proj).")
        seen[layer, expert, proj] = i
        t = canonical(t)
        if layer not in layers:
            raise GemqError(f"plan unit #{i} names layer {layer}, which has no routed experts.",
                            f"MoE layers are {layers[0]}..{layers[-1]}" + (f" ({len(layers)} layers)." if layers else "."))
        if expert is not None and not 0 <= expert < n_experts:
            raise GemqError(f"plan unit #{i} names expert {expert}, but layers have {n_experts} experts.",
                            f"use expert ids 0..{n_experts - 1}.")
        if proj is not None and proj not in projs:
            raise GemqError(f"plan unit #{i} names projection '{proj}'.", f"use one of {', '.join(projs)} or null.")
        for p in (projs if proj is None else (proj,)):
            for e in (range(n_experts) if expert is None else (expert,)):
                plan[(layer, p)][e] = t
    missing = [(l, p, e) for (l, p), ts in plan.items() for e, t in enumerate(ts) if t is None]
    if missing:
        l, p, e = missing[0]
        raise GemqError(f"the plan gives no type to {len(missing)} expert matrices (first: layer {l}, expert {e}, {p}).",
                        "add units for them, or a layer default like {\"layer\": L, \"expert\": null, \"proj\": null, ...}.")
    return plan  # type: ignore[return-value]


def plan_from_allocation(alloc: Allocation, layers: list[int], n_experts: int) -> ExpertPlan:
    """The writer's form of a solved allocation (one type per unit)."""
    return plan_from_units([{"layer": int(l), "expert": None if e is None else int(e), "proj": p, "type": t}
                            for (l, e, p), t in alloc.plan().items()],
                           layers, n_experts)


def load_plan(path: Path, layers: list[int], n_experts: int) -> ExpertPlan:
    """Read a plan (or an allocation report) from JSON."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise GemqError(f"cannot read plan {path}: {e}.", "pass a JSON file with a 'units' list.") from None
    if not isinstance(data, dict) or not isinstance(data.get("units"), list):
        raise GemqError(f"plan {path} has no 'units' list.", "pass a plan or an allocation JSON written by gemq-gguf.")
    return plan_from_units(data["units"], layers, n_experts)


def load_tensor_types(path: Path) -> dict[str, str]:
    """The `tensors` list of a plan or a whole-file report (GGUF name -> type); empty when it has none."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = data.get("tensors", []) if isinstance(data, dict) else []
    fix = "write tensors like {\"name\": \"blk.0.attn_q.weight\", \"type\": \"Q5_K\"}."
    if not isinstance(rows, list):
        raise GemqError(f"plan {path}: 'tensors' is not a list.", fix)
    out: dict[str, str] = {}
    for i, r in enumerate(rows):
        if not (isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("type"), str)):
            raise GemqError(f"plan {path}: tensor #{i} ({r}) is not {{name, type}}.", fix)
        if r["name"] in out:
            raise GemqError(f"plan {path}: tensor {r['name']} is typed twice.", "keep one entry per tensor.")
        out[r["name"]] = canonical(r["type"])
    return out


def tensor_rows(tensor_types: dict[str, str]) -> list[dict]:
    """The `tensors` list a report writes (and `load_tensor_types` reads back)."""
    return [{"name": n, "type": t} for n, t in sorted(tensor_types.items())]


def plan_units(plan: ExpertPlan) -> list[dict]:
    """The plan as an explicit `units` list (one unit per expert matrix)."""
    return [{"layer": l, "expert": e, "proj": p, "type": t}
            for (l, p), ts in sorted(plan.items()) for e, t in enumerate(ts)]
