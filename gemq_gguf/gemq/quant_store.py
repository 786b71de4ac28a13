"""The statistics cache's store of the expert matrices the writer quantized (`quant-KEY/`), so a later
run on the same model reuses every matrix whose type did not change.

Why: with sampled cost rows (`--cost-rows`, `auto` on large experts) the cost pass leaves no whole
candidate bytes, so every run's writer quantized every expert again, and ggml's IQ quantizers are slow
(~0.8 CPU s per 768x2048 matrix). The bytes depend only on the weights, the imatrix and ggml's quantizer,
so the key is the calibration's (checkpoint, calibration settings, code version with the ggml library)
plus the imatrix digest: not the candidate types, granularity, strategy or budget, which only decide
which matrices a run asks for.

Layout: per layer and per run that added entries, `L.RUN.safetensors` (name `tensor|expert|type`, ggml's
bytes, the full key in the metadata), written to a temporary name and renamed. A file that does not
open or was written for another key is reported, removed and ignored. The writer's new matrices are
held until its next layer starts (memory: about one layer's quantized experts) and persisted while the
store stays under `STORE_LIMIT`.
"""
from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np

from ..ggml.names import parse_expert_name
from ..ggml.quant import QuantCache
from .cache import _atomic, _quant_key as _key, _quant_name as _name
from .cache_key import FORMAT, arrays_digest, digest

log = logging.getLogger("gemq")

#: the store stops growing past this many bytes (a run then persists nothing more, and says so once)
STORE_LIMIT = 64 * 2**30
_KEY_CHARS = 32
_FILE_RE = re.compile(r"(\d+)\.[0-9a-f]+\.safetensors")

Key = tuple[str, int, str]


def store_key(calib_key: str, imatrix: dict[str, np.ndarray] | None) -> str:
    """What the writer's bytes depend on: the calibration's key (checkpoint, settings, code and ggml) and
    the imatrix the writer quantizes with."""
    return digest("quant", FORMAT, calib_key, arrays_digest(imatrix))


def _layer(key: Key) -> int:
    parsed = parse_expert_name(key[0])
    if parsed is None:
        raise ValueError(f"{key[0]} is not a routed-expert tensor")
    return parsed[0]


class StoredQuant(MutableMapping):
    """The writer's QuantCache: `inner` (the cost pass's candidates: a dict or `cache.QuantFiles`) first,
    then the store's files; matrices the writer adds are persisted. `close()` flushes the last layer,
    logs what was reused and returns the counts. Removed entries are only forgotten (files stay)."""

    def __init__(self, root: Path, key: str, inner: QuantCache, limit: int = STORE_LIMIT) -> None:
        self.path, self.key, self.inner, self.limit = root / f"quant-{key[:_KEY_CHARS]}", key, inner, limit
        self._index: dict[Key, Path] | None = None
        self._open: dict[Path, Any] = {}
        self._gone: set[Key] = set()
        self._fresh: dict[Key, np.ndarray] = {}    # added, not yet read back by the writer
        self._pending: dict[Key, np.ndarray] = {}  # added, not yet persisted (one layer)
        self._pending_layer: int | None = None
        self._stored = 0      # bytes of the store's files
        self._full = False
        self._run = uuid.uuid4().hex[:12]
        self.reused = self.quantized = 0

    # --- the files
    def _files(self) -> dict[Key, Path]:
        if self._index is None:
            self._index = {}
            for f in sorted(self.path.glob("*.safetensors")) if self.path.is_dir() else []:
                try:
                    self._index.update(dict.fromkeys(self._check(f), f))
                    self._stored += f.stat().st_size
                except Exception as e:  # noqa: BLE001 - any unreadable file is ignored
                    log.warning("cache: ignoring quantized experts %s (%s: %s); quantizing them again", f,
                                type(e).__name__, e)
                    self._open.pop(f, None)
                    f.unlink(missing_ok=True)
        return self._index

    def _check(self, f: Path) -> list[Key]:
        """The keys of one file, after checking its name, header and key (a truncated file fails to open)."""
        from safetensors import safe_open
        if not _FILE_RE.fullmatch(f.name):
            raise ValueError("not a file this store writes")
        h = self._open[f] = safe_open(str(f), framework="numpy")
        if (h.metadata() or {}).get("key") != self.key:
            raise ValueError("written for another key")
        keys = [_key(n) for n in h.keys()]
        for n in h.keys():
            s = h.get_slice(n)
            if s.get_dtype() != "U8" or len(s.get_shape()) != 2:
                raise ValueError(f"{n}: {s.get_dtype()} {s.get_shape()}, not 2-D bytes")
        return keys

    def _flush(self) -> None:
        data, layer = self._pending, self._pending_layer
        self._pending, self._pending_layer = {}, None
        if not data or self._full:
            return
        self._files()  # counts the files already there
        size = sum(v.nbytes for v in data.values())
        if self._stored + size > self.limit:
            self._full = True
            log.info("cache: the quantized-expert store %s would pass %.1f GiB; not saving more", self.path,
                     self.limit / 2**30)
            return
        from safetensors.numpy import save_file
        f = self.path / f"{layer}.{self._run}.safetensors"
        arrays = {_name(k): np.ascontiguousarray(v) for k, v in data.items()}
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            _atomic(f, lambda tmp: save_file(arrays, str(tmp), metadata={"key": self.key}))
            self._stored += f.stat().st_size
        except OSError as e:
            self._full = True
            log.warning("cache: could not save quantized experts (%s); continuing without", e)

    def close(self) -> dict[str, int]:
        """Persist the last layer; log and return how many expert matrices were reused and quantized."""
        self._flush()
        self._open.clear()
        log.info("writer: %d expert matrices from the cache, %d quantized", self.reused, self.quantized)
        return {"from_cache": self.reused, "quantized": self.quantized}

    # --- the mapping
    def __getitem__(self, key: Key) -> np.ndarray:
        if key in self._fresh:
            return self._fresh[key]
        if key in self.inner:
            value = self.inner[key]
        elif key not in self._gone and key in self._files():
            value = self._open[self._files()[key]].get_tensor(_name(key))
        else:
            raise KeyError(key)
        self.reused += 1
        return value

    def __setitem__(self, key: Key, value: np.ndarray) -> None:
        layer = _layer(key)
        if layer != self._pending_layer:
            self._flush()
            self._pending_layer = layer
        if not self._full:
            self._pending[key] = value
        self._fresh[key] = value
        self._gone.discard(key)
        self.quantized += 1

    def __delitem__(self, key: Key) -> None:
        if key not in self:
            raise KeyError(key)
        if key in self._fresh:
            del self._fresh[key]
        elif key in self.inner:
            del self.inner[key]
        self._gone.add(key)

    def __contains__(self, key: object) -> bool:
        return key in self._fresh or key in self.inner or (key not in self._gone and key in self._files())

    def __iter__(self) -> Iterator[Key]:
        seen = set(self._fresh)
        yield from self._fresh
        for k in self.inner:
            if k not in seen:
                seen.add(k)
                yield k
        yield from (k for k in self._files() if k not in seen and k not in self._gone)

    def __len__(self) -> int:
        return sum(1 for _ in self)
