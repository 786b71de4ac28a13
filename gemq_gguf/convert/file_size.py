"""What a file the writer will write takes, before it is written: the bytes of the tensors the whole-file
allocation does not decide, and a safe upper bound on everything else (header, metadata, tensor infos,
the grouped layout's extra tensors, alignment padding), so a `--target-size` file can never be larger.

The writer's file is: header, key/values, tensor infos, padding to the alignment, then every tensor's
data padded to the alignment (gguf-py's GGUFWriter). Key/values copied from the float GGUF are measured
exactly; the `gemq.*` keys and the grouped layout are bounded by their largest possible form.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from gguf import GGMLQuantizationType, GGUFReader, Keys

from ..allocate.joint import FileParts
from ..ggml.layout import group_tensor_name, qmap_name
from ..ggml.names import parse_expert_name, tensor_category
from ..ggml.types import fitting_type, type_info
from ..options import GRANULARITIES, STRATEGIES
from ..plan import ExpertPlan
from ..policy import TensorPolicy

_HEADER = 4 + 4 + 8 + 8             # magic, version, tensor count, kv count
#: what the writer may add on top of the bound below (none known): a margin against future keys
SLACK_BYTES = 64


def _str(s: str) -> int:
    return 8 + len(s.encode("utf-8"))


def _info(name: str, n_dims: int) -> int:
    """Bytes of one tensor info: name, n_dims, dims, type, offset."""
    return _str(name) + 4 + 8 * n_dims + 4 + 8


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def policy_tensors(src: GGUFReader, policy: TensorPolicy,
                   tensor_types: Mapping[str, str] | None = None) -> dict[str, tuple[str, int, int]]:
    """Every tensor that is not a routed expert: (type, bytes, weights) as the writer writes it
    (`tensor_types` over the policy, then llama.cpp's row-width fallback, as writer._Planner.plain)."""
    out = {}
    for t in src.tensors:
        if parse_expert_name(t.name) is not None:
            continue
        width, n = int(t.shape[0]), int(t.n_elements)
        want = (tensor_types or {}).get(t.name) or policy.type_for(t.name, len(t.shape))
        ty = fitting_type(want, width)
        out[t.name] = (ty, n // width * type_info(ty).row_bytes(width), n)
    return out


def file_parts(src: Path, policy: TensorPolicy, max_groups: int, candidate_types: tuple[str, ...]) -> FileParts:
    """The allocation's view of the file: policy bytes and weights of the non-expert tensors, every
    tensor's weights, and the overhead bound at `max_groups` groups per expert tensor."""
    reader = GGUFReader(src)
    fixed = policy_tensors(reader, policy)
    return FileParts(policy_bytes={k: v[1] for k, v in fixed.items()}, params={k: v[2] for k, v in fixed.items()},
                     total_params=sum(int(t.n_elements) for t in reader.tensors),
                     overhead_bytes=overhead_bound(reader, max_groups, candidate_types))


def _added_keys_bound(n_moe_layers: int, n_experts: int, n_expert_matrices: int,
                      candidate_types: tuple[str, ...]) -> int:
    """The keys the writer adds (general.file_type and writer._add_gemq_metadata's), at their largest."""
    scalars = {Keys.General.FILE_TYPE: 4, "gemq.version": 4, "gemq.budget": 4, "gemq.expert_bpw": 4,
               "gemq.grouped_tensors": 4, "gemq.routers_tuned": 1}
    n = sum(_str(k) + 4 + v for k, v in scalars.items())
    longest = max(map(len, (*STRATEGIES, "plan", *GRANULARITIES)))
    n += _str("gemq.strategy") + _str("gemq.granularity") + 2 * (4 + 8 + longest)
    n += _str("gemq.candidate_types") + 4 + 4 + 8 + sum(_str(t) for t in candidate_types)
    counts = {t.name: n_expert_matrices for t in GGMLQuantizationType}  # every type, each the largest count
    n += _str("gemq.type_counts") + 4 + _str(json.dumps(counts))
    # a permutation prints like range(n); layer ids counted at 10 digits each
    widest = {str(10 ** 9 + i): list(range(n_experts)) for i in range(n_moe_layers)}
    n += _str("gemq.expert_order") + 4 + _str(json.dumps(widest))
    return n


def overhead_bound(src: GGUFReader, max_groups: int, candidate_types: tuple[str, ...] = ()) -> int:
    """Bytes of the file beyond its non-I32 tensor data, at most: header, key/values (the source's as
    copied, the writer's own at their largest), tensor infos (a grouped expert tensor counted at
    `max_groups` groups with its I32 map and the map's data), the padding of the header and of every tensor."""
    align = int(src.alignment)
    kv = sum(sum(int(p.nbytes) for p in f.parts) for f in src.fields.values()
             if not f.name.startswith("GGUF.") and f.name != Keys.General.FILE_TYPE)
    infos, n_tensors, extra_data = 0, 0, 0
    layers, n_experts, n_matrices = set(), 1, 0
    for t in src.tensors:
        parsed = parse_expert_name(t.name)
        n_dims = len(t.shape)
        if parsed is None:
            infos += _info(t.name, n_dims)
            n_tensors += 1
            continue
        n_exp = int(t.shape[-1])
        layers.add(parsed[0])
        n_experts, n_matrices = max(n_experts, n_exp), n_matrices + n_exp
        g = max(1, min(max_groups, n_exp))
        if g == 1:
            infos += _info(t.name, n_dims)
            n_tensors += 1
        else:
            infos += sum(_info(group_tensor_name(t.name, i), n_dims) for i in range(g)) + _info(qmap_name(t.name), 2)
            n_tensors += g + 1
            extra_data += 4 * g * n_exp
    kv += _added_keys_bound(len(layers), n_experts, n_matrices, candidate_types)
    header = _pad(_HEADER + kv + infos, align)
    return header + extra_data + (align - 1) * n_tensors + SLACK_BYTES


def plan_size_bound(src: GGUFReader, plan: ExpertPlan, policy: TensorPolicy,
                    tensor_types: Mapping[str, str] | None = None, candidate_types: tuple[str, ...] = ()) -> int:
    """An upper bound on the size of the file `write_gguf(src, plan, policy, tensor_types=...)` writes."""
    fixed = sum(v[1] for v in policy_tensors(src, policy, tensor_types).values())
    expert, groups = 0, 1
    for t in src.tensors:
        parsed = parse_expert_name(t.name)
        if parsed is None:
            continue
        width, rows = int(t.shape[0]), int(t.shape[1])
        fitted = [fitting_type(x, width) for x in plan[parsed]]
        groups = max(groups, len(set(fitted)))
        expert += sum(rows * type_info(x).row_bytes(width) for x in fitted)
    return fixed + expert + overhead_bound(src, groups, candidate_types)


def quantized_shapes(src: Path, policy: TensorPolicy) -> dict[str, tuple[int, int]]:
    """(rows, row width) of every non-expert tensor the policy quantizes (not kept float, not a router):
    the tensors a whole-file allocation may type, before their costs say which ones it does."""
    out = {}
    for t in GGUFReader(src).tensors:
        if parse_expert_name(t.name) is not None or tensor_category(t.name, len(t.shape)) in ("f32", "router"):
            continue
        width = int(t.shape[0])
        out[t.name] = (int(t.n_elements) // width, width)
    return out
