"""LoRA adapters at run time: each adapter file read, checked against the loaded model and
uploaded once (float32 pairs in :class:`pyllm._core.LoraAdapter`), then given to a context with
each sequence's mix of them, so the base weights are never copied or changed.

    LLM(path, lora=["a.gguf", ("b.gguf", 0.5)])   # applied to every generation
    llm.set_lora([("b.gguf", 1.0)])                 # switched; the cached prefix is dropped

pyllm's bias/norm deltas (LLaMA2-Accessory's tuning) have no run-time path yet: an adapter that
carries them is refused here with the way to apply it (``pyllm export-lora``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pyllm.errors import ModelError
from pyllm.formats.lora import AdapterSpec

if TYPE_CHECKING:
    from pyllm.runtime.loaded import LoadedModel

# GGUF block matrix -> the C++ layer slot (pyllm/model.h kLayerSlots)
SLOTS = {"attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
         "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down"}

LoraSpec = AdapterSpec


def lora_specs(adapters: Sequence[LoraSpec] | None) -> list[tuple[Path, float]]:
    """``["a.gguf", ("b.gguf", 0.5)]`` -> [(path, scale)] (scale 1.0 by default), checked."""
    from pyllm.formats.lora import adapter_specs

    if adapters is None:
        return []
    if isinstance(adapters, (str, os.PathLike)) or (isinstance(adapters, tuple) and
                                                     len(adapters) == 2 and
                                                     not isinstance(adapters[1], tuple)):
        adapters = [adapters]  # type: ignore[list-item]
    return adapter_specs(list(adapters))


@dataclass
class LoadedAdapter:
    path: Path
    core: Any  # pyllm._core.LoraAdapter
    n_pairs: int
    max_rank: int


def load_adapter(model: LoadedModel, path: Path) -> LoadedAdapter:
    """Read ``path``, check it against ``model`` and upload its pairs."""
    from pyllm.formats.lora import check_against, read_adapter
    from pyllm.runtime.loaded import core_module

    adapter = read_adapter(path)
    shapes = {t.name: t.shape for t in model._reader.tensors}
    check_against(adapter, model.hparams.arch, shapes)
    if adapter.deltas:
        names = ", ".join(sorted(adapter.deltas)[:3])
        raise ModelError(f"LoRA adapter {path.name} carries bias/norm deltas ({names}...), which "
                         "are applied only by merging: pyllm export-lora")
    core = core_module().LoraAdapter(model.hparams.n_layer)
    for name, pair in adapter.pairs.items():
        _, layer, matrix, _ = name.split(".")
        # an F16 pair stays F16 (exactly its values, half the bytes decode streams per token)
        dtype = np.float16 if pair.half else np.float32
        core.set(int(layer), SLOTS[matrix], pair.a.astype(dtype), pair.b.astype(dtype),
                 adapter.alpha / pair.rank)
    return LoadedAdapter(path, core, len(adapter.pairs), int(core.max_rank))


class AdapterSet:
    """The adapters one context knows, loaded once per file (by resolved path)."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.loaded: list[LoadedAdapter] = []

    def index(self, path: Path) -> int:
        """The adapter's index, loading it on first use."""
        key = path.resolve()
        for i, a in enumerate(self.loaded):
            if a.path.resolve() == key:
                return i
        self.loaded.append(load_adapter(self.model, path))
        return len(self.loaded) - 1

    def mix(self, specs: Sequence[tuple[Path, float]]) -> list[tuple[int, float]]:
        return [(self.index(p), s) for p, s in specs]

    def cores(self) -> list[Any]:
        return [a.core for a in self.loaded]


__all__ = ["SLOTS", "AdapterSet", "LoadedAdapter", "LoraSpec", "load_adapter", "lora_specs"]
