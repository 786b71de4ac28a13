"""A Hugging Face model whose weights stay in the safetensors shards until one part of it is needed.

Layer-streamed calibration (`streaming.py`) holds one decoder layer's weights at a time. This module
gives it the model skeleton, built from the config with every parameter on the meta device (buffers,
e.g. rotary frequencies, are computed for real: they are small and not all are in the checkpoint),
and `loaded(part)`: the part's tensors read from the memory-mapped shards through transformers' own
loading (its key renamings and weight conversions, e.g. per-expert checkpoint tensors fused into the
experts' stacked parameters), so a materialised layer holds exactly what `from_pretrained` would put
there; on exit the part's parameters go back to the meta device and their memory is freed.

Parts: "embed" (the input embeddings), each decoder layer index, and "head" (everything outside the
layers but the embeddings: final norm, LM head; with tied embeddings the embeddings too). A multimodal
checkpoint gives its text model (`archs/text_model.py`): its text tensors are read under their renamed
names, and tensors that name nothing in the text model (the vision tower and projector) are never read.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..archs import ArchAdapter, key_mapping, text_config
from ..errors import GemqError

Part = int | str
#: safetensors' names of the float dtypes a checkpoint may store
_STORED = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get meta parameters and real buffers (what accelerate's
    `init_empty_weights(include_buffers=False)` does; accelerate is optional here)."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's shards (those the index names when there is one); empty when it is not safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    return sorted(model_dir.glob("*.safetensors"))


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


class LayerSource:
    """The skeleton model and its checkpoint, one part materialised at a time (on `device`, in `dtype`;
    `experts_implementation` as `from_pretrained` takes it, e.g. "eager" for float64, which grouped_mm lacks)."""

    def __init__(self, model_dir: Path, adapter: ArchAdapter, dtype: torch.dtype,
                 device: torch.device | str = "cpu", experts_implementation: str | None = None) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.conversion_mapping import get_model_conversion_mapping
        files = safetensors_files(Path(model_dir))
        if not files:
            raise GemqError(f"{model_dir} has no safetensors weights; layer streaming reads safetensors shards.",
                            "use --calib-memory full, or convert the checkpoint to safetensors.")
        self.device, self.dtype = torch.device(device), dtype
        config = AutoConfig.from_pretrained(model_dir)
        if getattr(config, "quantization_config", None):
            raise GemqError(f"{model_dir} is a quantized checkpoint (quantization_config); layer streaming reads "
                            "plain float weights.", "use --calib-memory full, or a float (bf16/f32) checkpoint.")
        with _parameters_on_meta():
            self.model = AutoModelForCausalLM.from_config(text_config(config), dtype=dtype, **(
                {"experts_implementation": experts_implementation} if experts_implementation else {}))
        self.model.eval().requires_grad_(False)
        for m in self.model.modules():  # buffers (rotary frequencies, ...) where the layers run
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = b.to(self.device)
        self.layers = adapter.decoder_layers(self.model)
        self._mapping = get_model_conversion_mapping(self.model, key_mapping=key_mapping(config) or None)
        self._files = files
        self._parts = self._group_keys()
        self._held: list[int] = []

    # -- which checkpoint keys feed which part --------------------------------------------------------
    def _group_keys(self) -> dict[Part, list[tuple[Path, str]]]:
        from safetensors import safe_open
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        renamings = [t for t in self._mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in self._mapping if isinstance(t, WeightConverter)]
        meta_sd = self.model.state_dict()
        prefix = _module_name(self.model, self.layers) + "."
        embed = _module_name(self.model, self.model.get_input_embeddings()) + "."
        tied = bool(getattr(self.model, "all_tied_weights_keys", None))
        parts: dict[Part, list[tuple[Path, str]]] = {}
        for path in self._files:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
            for key in keys:
                target, _ = rename_source_key(key, renamings, converters, self.model.base_model_prefix, meta_sd)
                if target not in meta_sd:  # no tensor of the model: a multimodal checkpoint's vision tower
                    continue
                if target.startswith(prefix):
                    part: Part = int(target[len(prefix):].split(".", 1)[0])
                elif target.startswith(embed):
                    part = "embed"
                    if tied:
                        parts.setdefault("head", []).append((path, key))
                else:
                    part = "head"
                parts.setdefault(part, []).append((path, key))
        return parts

    def module(self, part: Part) -> nn.Module:
        if part == "embed":
            return self.model.get_input_embeddings()
        return self.layers[part] if isinstance(part, int) else self.model

    # -- materialise and drop -----------------------------------------------------------------------
    @contextlib.contextmanager
    def loaded(self, part: Part) -> Iterator[nn.Module]:
        """The part's weights read from the shards for the duration of the block, then dropped."""
        self._load(part)
        try:
            yield self.module(part)
        finally:
            self._drop(part)

    def hold(self, layer: int, window: int = 2) -> nn.Module:
        """Layer `layer` materialised until `release`, with at most `window` layers held (the oldest are
        dropped before it loads, so a load's transient peak never meets more than `window - 1` held layers):
        for readers that walk the layers in order, e.g. cost estimation."""
        if layer not in self._held:
            while len(self._held) >= window:
                self._drop(self._held.pop(0))
            self._load(layer)
            self._held.append(layer)
        return self.layers[layer]

    def release(self) -> None:
        """Drop every layer `hold` materialised."""
        while self._held:
            self._drop(self._held.pop())

    def _owned(self, part: Part) -> list[tuple[nn.Module, str]]:
        """(module, parameter name) of what `part` holds (for "head": every parameter outside the layers
        and, unless tied, the embeddings)."""
        if part != "head":
            mod = self.module(part)
            return [(m, n) for m in mod.modules() for n in m._parameters if m._parameters[n] is not None]
        skip = {id(m) for m in self.layers.modules()}
        if not getattr(self.model, "all_tied_weights_keys", None):
            skip |= {id(m) for m in self.model.get_input_embeddings().modules()}
        return [(m, n) for m in self.model.modules() if id(m) not in skip
                for n in m._parameters if m._parameters[n] is not None]

    def _load(self, part: Part) -> None:
        """Read the part's tensors with the shards memory-mapped only meanwhile (an open mapping keeps
        the pages it touched in the process's resident memory)."""
        from safetensors import safe_open
        keys = self._parts.get(part, [])
        with contextlib.ExitStack() as stack:
            handles = {f: stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
                       for f in dict.fromkeys(f for f, _ in keys)}
            state = {key: handles[f].get_slice(key) for f, key in keys}
            dtypes = {t.get_dtype() for t in state.values()}
            stored = _STORED.get(dtypes.pop()) if len(dtypes) == 1 else None
            narrow = stored if stored is not None and stored.itemsize < self.dtype.itemsize else None
            skeleton = self._narrow(part, narrow) if narrow is not None else {}
            self._convert(state)
        self._widen(part, skeleton)
        if part == "head" and getattr(self.model, "all_tied_weights_keys", None):
            self.model.tie_weights(recompute_mapping=False)
        missing = [n for m, n in self._owned(part) if m._parameters[n].device.type == "meta"]
        if missing:
            raise GemqError(f"the checkpoint has no weights for {missing[:3]} (part {part!r} of the model).",
                            "check that the checkpoint is complete, or use --calib-memory full.")
        for m, n in self._owned(part):
            m._parameters[n].requires_grad_(False)

    def _narrow(self, part: Part, dtype: torch.dtype) -> dict[tuple[int, str], torch.dtype]:
        """Give the part's meta parameters the checkpoint's narrower dtype (bf16 into a float32 skeleton), so
        that transformers' fusing of per-expert tensors copies half the bytes (measured on a bf16 layer of
        Qwen3-30B-A3B's shapes, 2.3 GiB at float32: peak RSS 4.2 instead of 5.4 GiB); returns each changed
        parameter's skeleton dtype for `_widen`."""
        skeleton = {}
        for m, n in self._owned(part):
            p = m._parameters[n]
            if p.dtype.itemsize > dtype.itemsize:
                skeleton[(id(m), n)] = p.dtype
                m._parameters[n] = nn.Parameter(torch.empty_like(p, dtype=dtype), requires_grad=False)
        return skeleton

    def _widen(self, part: Part, skeleton: dict[tuple[int, str], torch.dtype]) -> None:
        """Back to the skeleton's dtypes (float32 parameters a float64 model keeps stay float32), one parameter
        at a time; widening is exact."""
        for m, n in self._owned(part):
            want = skeleton.get((id(m), n))
            if want is not None and m._parameters[n].dtype != want:
                m._parameters[n] = nn.Parameter(m._parameters[n].to(want), requires_grad=False)
        if skeleton:
            _trim_heap()

    def _convert(self, state: dict[str, Any]) -> None:
        """transformers' own loading (renamings, expert fusing, dtype) of `state` into the skeleton."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging
        config = LoadStateDictConfig(device_map={"": self.device}, dtype=self.dtype,
                                     dtype_plan=self.model._get_dtype_plan(self.dtype), weight_mapping=self._mapping)
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            convert_and_load_state_dict_in_model(self.model, state, config)
        finally:
            if bar:
                hf_logging.enable_progress_bar()

    def _drop(self, part: Part) -> None:
        for m, n in self._owned(part):
            p = m._parameters[n]
            m._parameters[n] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        _trim_heap()


def _trim_heap() -> None:
    """Give freed heap memory back to the system (glibc keeps it otherwise: the layers' weights and
    activations, freed in pieces, would make the process's resident memory grow layer after layer)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc: Any = None
