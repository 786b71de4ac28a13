"""Checks on a checkpoint's safetensors files, from their headers only (no weight is read).

Truncated or missing shards, an index that names tensors its shards lack, and weights whose sizes
disagree with config.json all end in a one-line error before the converter starts, instead of a
converter traceback or a GGUF that llama.cpp refuses to load.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from ..archs import MoeShape
from ..errors import GemqError

INDEX = "model.safetensors.index.json"
REDOWNLOAD = "download or save the checkpoint again."

# a routed expert stored one matrix per expert: model.layers.L.<...>.experts.E.<proj>.weight
_PER_EXPERT = re.compile(r"(?:^|\.)layers\.(\d+)\..*\bexperts\.(\d+)\.")


def _index(model_dir: Path) -> dict[str, str] | None:
    """The index's tensor -> shard map, or None for an unsharded checkpoint."""
    path = model_dir / INDEX
    if not path.is_file():
        return None
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError) as e:
        raise GemqError(f"{path} cannot be read ({e}).", REDOWNLOAD) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise GemqError(f"{path} has no valid 'weight_map'.", REDOWNLOAD)
    return weight_map


def _header(f: Path) -> dict[str, Any]:
    """A shard's tensor table (name -> {dtype, shape, data_offsets}); the file must hold all its data."""
    size = f.stat().st_size
    try:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise GemqError(f"{f} is corrupt ({e}).", REDOWNLOAD) from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise GemqError(f"{f} is truncated: {size} bytes, its header needs {8 + n + end}.", REDOWNLOAD)
    return header


def check_safetensors(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every shard present and complete, every indexed tensor where the index says; returns the
    shape of every tensor in the checkpoint."""
    weight_map = _index(model_dir)
    if weight_map is None:
        files = sorted(model_dir.glob("*.safetensors"))
    else:
        files = [model_dir / s for s in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise GemqError(f"{model_dir} lacks {len(missing)} of the {len(files)} shards that {INDEX} lists "
                            f"(first: {missing[0]}).", "download the missing shards (the download stopped early?).")
    if not files:
        raise GemqError(f"{model_dir} has no *.safetensors weights.",
                        "save the model with safe_serialization=True (pickled pytorch_model.bin is never loaded).")
    headers = {f.name: _header(f) for f in files}
    for name, shard in (weight_map or {}).items():
        if name not in headers[shard]:
            raise GemqError(f"{INDEX} puts {name} in {shard}, which does not hold it.",
                            "download the checkpoint again (the index and the shards are from different versions).")
    return {name: tuple(v["shape"]) for h in headers.values() for name, v in h.items()}


def check_shapes(expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]], shape: MoeShape) -> None:
    """The weights must be the model config.json describes. `expected`: the shapes of the model built
    from the config (meta device); tensors both name are compared by size (a checkpoint may store a
    matrix transposed or split), and routed experts stored one per expert by count and matrix size."""
    fix = "use the config.json that came with these weights (or the weights that match this config)."
    for name, want in expected.items():
        got = stored.get(name)
        if got is not None and _numel(got) != _numel(want):
            raise GemqError(f"{name} is {list(got)} in the weights, but config.json implies {list(want)}.", fix)
    ids: dict[int, set[int]] = {}
    sizes = {shape.hidden * shape.expert_ffn, 2 * shape.hidden * shape.expert_ffn}  # one matrix, or gate+up fused
    for name, got in stored.items():
        m = _PER_EXPERT.search(name)
        if m is None or not name.endswith(".weight"):
            continue
        ids.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        if len(got) == 2 and _numel(got) not in sizes:
            raise GemqError(f"{name} is {list(got)} in the weights, but config.json implies routed experts of "
                            f"{shape.expert_ffn} x {shape.hidden}.", fix)
    for layer, found in sorted(ids.items()):
        if layer in shape.moe_layers and len(found) != shape.n_experts:
            raise GemqError(f"layer {layer} has {len(found)} routed experts in the weights, config.json says "
                            f"{shape.n_experts}.", fix)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
