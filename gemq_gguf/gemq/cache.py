"""On-disk cache of calibration statistics and cost tables, so a second `--budget`, `--strategy` or
`--granularity` on the same model skips the expensive passes.

Location: `--cache-dir`, else `${GEMQ_GGUF_HOME:-~/.cache/gemq-gguf}/stats/` (delete it freely).
Entries (names from `cache_key`: checkpoint, calibration tokens and settings, code version):
- `calib-KEY/`: one calibration (`stats.CalibStats`): `meta.json`, per layer `L.npz` with the small
  arrays (routing, imatrix sums, counts) and `L.FIELD.npy` for the large ones (x and g), memory-mapped
  on load. Written in a temporary folder renamed into place: an entry is whole or absent.
- `costs-KEY/` (KEY adds candidate types, granularity, imatrix and cost device): per layer `L.npz`
  (`costs.LayerCosts`), each written to a temporary name and renamed, so an interrupted cost pass resumes
  from the last finished layer; and `L.quant.safetensors`, that layer's quantized candidates (ggml's
  bytes), which the writer then reads instead of quantizing again (when all layers' fit `QUANT_LIMIT`).
- `quant-KEY/` (KEY: the calibration's plus the imatrix; not types, granularity or strategy): the expert
  matrices the writer quantized, per layer and run `L.RUN.safetensors`, so the next run on the model
  quantizes only matrices whose type is new (gemq.quant_store; up to its `STORE_LIMIT`). The writer looks
  in the cost entry's candidates first, then here.
Only numpy/safetensors arrays and JSON: nothing is unpickled. An entry that fails to load (truncated,
corrupt, another layout) is reported, removed and computed again.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..ggml.names import parse_expert_name
from ..ggml.quant import QuantCache
from ..options import CacheOptions, CalibOptions
from ..runtime import home
from .cache_key import FORMAT, arrays_digest, checkpoint_fingerprint, code_version, digest, file_fingerprint, tensor_digest
from .costs import CostTable, LayerCosts, assemble_table
from .stats import CalibStats, LayerStats
from .tensor_costs import TensorCostTable
from .tensor_stats import TensorStats, TensorUse

log = logging.getLogger("gemq")

#: quantized candidates are kept on disk when all layers' together fit this (else the writer re-quantizes)
QUANT_LIMIT = 16 * 2**30
_LARGE = 2**20  # arrays with more elements are stored as .npy and memory-mapped back
_KEY_CHARS = 32


def default_cache_dir() -> Path:
    return home().expanduser() / "stats"


def cache_root(opts: CacheOptions) -> Path | None:
    """The folder of the cache `opts` asks for, or None with `--no-cache`."""
    if not opts.enabled:
        return None
    return Path(opts.dir).expanduser() if opts.dir else default_cache_dir()


def open_cache(opts: CacheOptions) -> "StatsCache | None":
    """The cache `opts` asks for, or None with `--no-cache`."""
    root = cache_root(opts)
    return StatsCache(root) if root is not None else None


def _atomic(path: Path, write: Any) -> None:
    """`write(tmp)` then rename to `path`: readers see the whole file or none."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _discard(path: Path, what: str, err: BaseException) -> None:
    log.warning("cache: ignoring %s %s (%s: %s); computing it again", what, path, type(err).__name__, err)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    dtype = str(t.dtype).removeprefix("torch.")
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy(), dtype
    return t.contiguous().numpy(), dtype


def _to_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


class StatsCache:
    """The cache folder; hands out one entry per calibration and per cost table."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def calibration(self, model_dir: Path, tokens: torch.Tensor, calib: CalibOptions, numerics: str) -> "CalibEntry":
        """The entry of this checkpoint calibrated on `tokens` with `calib`'s settings; `numerics` names the
        device and dtype the statistics are computed in (they change the floats)."""
        key = digest("calib", FORMAT, checkpoint_fingerprint(model_dir), tensor_digest(tokens), list(calib.texts),
                     calib.fisher, calib.seed, calib.tensor_tokens, numerics, code_version())
        return CalibEntry(self.root / f"calib-{key[:_KEY_CHARS]}", key)

    def costs(self, calib_key: str, types: Sequence[str], granularity: str, imatrix: dict[str, np.ndarray] | None,
              device: str, layers: Sequence[int], rows: float = 1.0) -> "CostEntry":
        """`rows`: the sampled fraction of rows (`--cost-rows`); 1 keeps the exact costs' key."""
        key = digest("costs", calib_key, list(types), granularity, arrays_digest(imatrix), device,
                     *([] if rows >= 1.0 else [f"rows={rows!r}"]))
        return CostEntry(self.root / f"costs-{key[:_KEY_CHARS]}", list(types), granularity, list(layers))

    def tensor_costs(self, calib_key: str, types: Sequence[str], imatrix: dict[str, np.ndarray] | None,
                     float_gguf: Path, device: str) -> "TensorCostEntry":
        """The non-expert cost table (`tensor_costs.TensorCostStore`) of these statistics, types and float GGUF."""
        key = digest("tensor-costs", calib_key, list(types), arrays_digest(imatrix), file_fingerprint(float_gguf),
                     device)
        return TensorCostEntry(self.root / f"tensor-costs-{key[:_KEY_CHARS]}.npz")


@dataclasses.dataclass
class CalibEntry:
    path: Path
    key: str

    def load(self) -> CalibStats | None:
        """The cached statistics, or None (absent, or unreadable: then removed with a warning)."""
        if not self.path.is_dir():
            return None
        try:
            meta = json.loads((self.path / "meta.json").read_text())
            if meta.get("format") != FORMAT or meta.get("key") != self.key:
                raise ValueError("written for another key or layout")
            stats = {l: self._layer(l, meta["fields"]) for l in meta["layers"]}
            tensors = _load_tensors(self.path, meta["tensors"]) if meta.get("tensors") else None
            log.info("cache: calibration statistics from %s", self.path)
            return CalibStats(layers=stats, tensors=tensors, **meta["stats"])
        except Exception as e:  # noqa: BLE001 - any unreadable entry is recomputed
            _discard(self.path, "calibration entry", e)
            return None

    def _layer(self, l: int, fields: dict[str, str]) -> LayerStats:
        values: dict[str, Any] = {"layer": l}
        with np.load(self.path / f"{l}.npz", allow_pickle=False) as small:
            for name, dtype in fields.items():
                if name in small.files:
                    values[name] = _to_torch(np.array(small[name]), dtype)
                else:
                    a = np.load(self.path / f"{l}.{name}.npy", mmap_mode="c", allow_pickle=False)
                    values[name] = _to_torch(a, dtype)
        return LayerStats(**values)

    def save(self, stats: CalibStats) -> None:
        """Write the entry (in a temporary folder renamed into place); an existing entry is kept."""
        if self.path.exists():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        try:
            fields: dict[str, str] = {}
            for l, s in stats.layers.items():
                small = {}
                for f in dataclasses.fields(s):
                    v = getattr(s, f.name)
                    if not isinstance(v, torch.Tensor):
                        continue
                    a, fields[f.name] = _to_numpy(v)
                    if a.size > _LARGE:
                        np.save(tmp / f"{l}.{f.name}.npy", a)
                    else:
                        small[f.name] = a
                np.savez(tmp / f"{l}.npz", **small)
            meta = {"format": FORMAT, "key": self.key, "layers": list(stats.layers), "fields": fields,
                    "tensors": _save_tensors(tmp, stats.tensors) if stats.tensors is not None else None,
                    "stats": {"n_seq": stats.n_seq, "seq_len": stats.seq_len, "loss": stats.loss,
                              "projs": list(stats.projs), "datasets": list(stats.datasets)}}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            os.rename(tmp, self.path)
            log.info("cache: calibration statistics saved to %s (%.2f GiB)", self.path, _size(self.path) / 2**30)
        except OSError as e:
            log.warning("cache: could not save the calibration (%s); continuing without", e)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _save_array(folder: Path, name: str, t: torch.Tensor, small: dict[str, np.ndarray]) -> str:
    a, dtype = _to_numpy(t)
    if a.size > _LARGE:
        np.save(folder / f"{name}.npy", a)
    else:
        small[name] = a
    return dtype


def _load_array(folder: Path, name: str, dtype: str, small: Any) -> torch.Tensor:
    if name in small.files:
        return _to_torch(np.array(small[name]), dtype)
    return _to_torch(np.load(folder / f"{name}.npy", mmap_mode="c", allow_pickle=False), dtype)


def _save_tensors(folder: Path, ts: TensorStats) -> dict[str, Any]:
    """The non-expert records into `folder` (tensors.npz, large arrays as tensors.*.npy); returns their meta."""
    small: dict[str, np.ndarray] = {}
    dtypes = {"seqs": _save_array(folder, "t.seqs", ts.seqs, small)}
    if ts.ids is not None:
        dtypes["ids"] = _save_array(folder, "t.ids", ts.ids, small)
    inputs = list(ts.inputs)
    for i, key in enumerate(inputs):
        dtypes[f"x{i}"] = _save_array(folder, f"t.x{i}", ts.inputs[key], small)
        dtypes[f"s{i}"] = _save_array(folder, f"t.s{i}", ts.sum2[key], small)
    uses = []
    for i, u in enumerate(ts.uses):
        dtypes[f"g{i}"] = _save_array(folder, f"t.g{i}", u.g, small)
        if u.rows is not None:
            dtypes[f"r{i}"] = _save_array(folder, f"t.r{i}", u.rows, small)
        uses.append({"name": u.name, "module": u.module, "kind": u.kind, "shape": list(u.shape), "x": u.x})
    np.savez(folder / "tensors.npz", **small)
    return {"seq_len": ts.seq_len, "n_tokens": ts.n_tokens, "skipped": ts.skipped, "inputs": inputs, "uses": uses,
            "dtypes": dtypes}


def _load_tensors(folder: Path, meta: dict[str, Any]) -> TensorStats:
    d = meta["dtypes"]
    with np.load(folder / "tensors.npz", allow_pickle=False) as small:
        def arr(key: str) -> torch.Tensor | None:
            return _load_array(folder, f"t.{key}", d[key], small) if key in d else None
        uses = [TensorUse(name=u["name"], module=u["module"], kind=u["kind"], shape=tuple(u["shape"]),
                          g=arr(f"g{i}"), x=u["x"], rows=arr(f"r{i}")) for i, u in enumerate(meta["uses"])]
        return TensorStats(seqs=arr("seqs"), seq_len=meta["seq_len"], n_tokens=meta["n_tokens"], uses=uses,
                           inputs={k: arr(f"x{i}") for i, k in enumerate(meta["inputs"])},
                           sum2={k: arr(f"s{i}") for i, k in enumerate(meta["inputs"])}, ids=arr("ids"),
                           skipped=list(meta["skipped"]))


class TensorCostEntry:
    """One non-expert cost table in one .npz file (`tensor_costs.TensorCostStore`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> TensorCostTable | None:
        if not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as z:
                a = {k: np.array(z[k]) for k in z.files}
            log.info("cache: non-expert tensor costs from %s", self.path)
            return TensorCostTable(names=a["names"].tolist(), types=a["types"].tolist(), cost=a["cost"],
                                   bits=a["bits"], params=a["params"], notes=a["notes"].tolist())
        except Exception as e:  # noqa: BLE001 - an unreadable entry is recomputed
            _discard(self.path, "tensor cost table", e)
            return None

    def save(self, table: TensorCostTable) -> None:
        arrays = dict(names=np.asarray(table.names, dtype=str), types=np.asarray(table.types, dtype=str),
                      cost=table.cost, bits=table.bits, params=table.params, notes=np.asarray(table.notes, dtype=str))

        def write(tmp: Path) -> None:
            with tmp.open("wb") as fh:
                np.savez(fh, **arrays)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _atomic(self.path, write)
        except OSError as e:
            log.warning("cache: could not save the tensor costs (%s)", e)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


class CostEntry:
    """One cost table, layer by layer (`costs.LayerStore`), and its quantized candidates."""

    def __init__(self, path: Path, types: list[str], granularity: str, layers: list[int]) -> None:
        self.path, self.types, self.granularity, self.layers = path, types, granularity, layers
        self._keep_quant: bool | None = None

    def _file(self, layer: int) -> Path:
        return self.path / f"{layer}.npz"

    def _quant_file(self, layer: int) -> Path:
        return self.path / f"{layer}.quant.safetensors"

    def load(self, layer: int) -> LayerCosts | None:
        f = self._file(layer)
        if not f.exists():
            return None
        try:
            with np.load(f, allow_pickle=False) as z:
                a = {k: np.array(z[k]) for k in z.files}  # reads every member: a bad CRC raises here
            if a["cost"].shape[1:] != (len(self.types),) or a["bits"].shape != a["cost"].shape:
                raise ValueError(f"cost rows of shape {a['cost'].shape} for {len(self.types)} types")
            if bool(a["quant"]):
                from safetensors import safe_open
                safe_open(str(self._quant_file(layer)), framework="numpy")  # a truncated file raises here
            return LayerCosts(layer=layer, cost=a["cost"], bits=a["bits"], params=a["params"],
                              never_routed=a["never_routed"].tolist(), token_counts=a["token_counts"],
                              notes=a["notes"].tolist())
        except Exception as e:  # noqa: BLE001 - any unreadable layer is recomputed
            _discard(f, "cost layer", e)
            self._quant_file(layer).unlink(missing_ok=True)
            return None

    def save(self, rec: LayerCosts, quantized: QuantCache) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if self._keep_quant is None:
            self._keep_quant = sum(v.nbytes for v in quantized.values()) * len(self.layers) <= QUANT_LIMIT
        keep = self._keep_quant and bool(quantized)
        try:
            if keep:
                from safetensors.numpy import save_file
                data = {_quant_name(k): np.ascontiguousarray(v) for k, v in quantized.items()}
                _atomic(self._quant_file(rec.layer), lambda tmp: save_file(data, str(tmp)))
            arrays = dict(cost=rec.cost, bits=rec.bits, params=rec.params,
                          never_routed=np.asarray(rec.never_routed, dtype=np.int64), token_counts=rec.token_counts,
                          notes=np.asarray(rec.notes, dtype=str), quant=np.asarray(keep))

            def write(tmp: Path) -> None:
                with tmp.open("wb") as fh:
                    np.savez(fh, **arrays)
            _atomic(self._file(rec.layer), write)
        except OSError as e:
            log.warning("cache: could not save layer %d's costs (%s)", rec.layer, e)

    def table(self, n_experts: int, projs: tuple[str, ...]) -> CostTable | None:
        """The whole table when every layer is cached (no model needed), else None."""
        recs = []
        for l in self.layers:
            rec = self.load(l)
            if rec is None:
                return None
            recs.append(rec)
        log.info("cache: GEMQ costs from %s", self.path)
        return assemble_table(recs, n_experts, projs, self.types, self.granularity, kept=True)

    def quant_cache(self) -> "QuantFiles":
        """The layers' quantized candidates on disk, as the writer's QuantCache."""
        return QuantFiles({l: self._quant_file(l) for l in self.layers if self._quant_file(l).exists()})


def _quant_name(key: tuple[str, int, str]) -> str:
    return f"{key[0]}|{key[1]}|{key[2]}"


def _quant_key(name: str) -> tuple[str, int, str]:
    tensor, e, t = name.split("|")
    return tensor, int(e), t


class QuantFiles(MutableMapping):
    """A QuantCache whose entries are read from the cost entry's files when asked for (memory: one
    matrix); added entries live in memory, removed ones are only forgotten (the files stay cached)."""

    def __init__(self, files: dict[int, Path]) -> None:
        self._files = files
        self._open: dict[int, Any] = {}
        self._added: dict[tuple[str, int, str], np.ndarray] = {}
        self._gone: set[tuple[str, int, str]] = set()
        self._keys: set[tuple[str, int, str]] | None = None

    def _handle(self, layer: int) -> Any:
        if layer not in self._open:
            from safetensors import safe_open
            self._open[layer] = safe_open(str(self._files[layer]), framework="numpy")
        return self._open[layer]

    def _on_disk(self) -> set[tuple[str, int, str]]:
        if self._keys is None:
            self._keys = {_quant_key(n) for l in self._files for n in self._handle(l).keys()}
        return self._keys

    def __getitem__(self, key: tuple[str, int, str]) -> np.ndarray:
        if key in self._added:
            return self._added[key]
        if key in self._gone or key not in self._on_disk():
            raise KeyError(key)
        parsed = parse_expert_name(key[0])
        assert parsed is not None
        return self._handle(parsed[0]).get_tensor(_quant_name(key))

    def __setitem__(self, key: tuple[str, int, str], value: np.ndarray) -> None:
        self._added[key] = value
        self._gone.discard(key)

    def __delitem__(self, key: tuple[str, int, str]) -> None:
        if key not in self:
            raise KeyError(key)
        self._added.pop(key, None)
        self._gone.add(key)

    def __contains__(self, key: object) -> bool:
        return key in self._added or (key not in self._gone and key in self._on_disk())

    def __iter__(self) -> Iterator[tuple[str, int, str]]:
        yield from self._added
        yield from (k for k in self._on_disk() if k not in self._gone and k not in self._added)

    def __len__(self) -> int:
        return sum(1 for _ in self)
