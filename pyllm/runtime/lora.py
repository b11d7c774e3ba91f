"""LoRA adapters at run time: each adapter file read, checked against the loaded model and
uploaded once (float32 pairs in :class:`pyllm._core.LoraAdapter`), then given to a context with
each sequence's mix of them, so the base weights are never copied or changed.

    LLM(path, lora=["a.gguf", ("b.gguf", 0.5)])   # applied to every generation
    llm.set_lora([("b.gguf", 1.0)])                 # switched; the cached prefix is dropped

pyllm's bias/norm deltas (LLaMA2-Accessory's bias and norm tuning) are applied the same way,
per sequence and scaled: a norm's weights become ``w + scale * delta`` for that sequence's
tokens, a bias delta is added times the scale (a bias the base lacks included).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyllm.errors import ModelError

if TYPE_CHECKING:
    from pyllm.runtime.loaded import LoadedModel

# GGUF block matrix -> the C++ layer slot (pyllm/model.h kLayerSlots)
SLOTS = {"attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
         "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down"}
# GGUF vector a delta may adapt -> the C++ delta slot (pyllm/lora.h DeltaSlot)
DELTA_SLOTS = {"attn_norm.weight": "attn_norm", "ffn_norm.weight": "ffn_norm",
               "attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv",
               "attn_output.bias": "bo", "ffn_gate.bias": "b_gate", "ffn_up.bias": "b_up",
               "ffn_down.bias": "b_down"}

if TYPE_CHECKING:  # (pyllm.formats.lora, numpy with it, is imported once an adapter is read)
    from pyllm.formats.lora import AdapterSpec as LoraSpec


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
    slots = [(name, _delta_slot(name)) for name in sorted(adapter.deltas)]
    for name, slot in slots:
        if slot is None:
            raise ModelError(f"LoRA adapter {path.name}: a delta of {name} cannot be applied at "
                             "run time (only norms and block biases can); merge it with "
                             "pyllm export-lora")
    core = core_module().LoraAdapter(model.hparams.n_layer)
    for name, slot in slots:
        assert slot is not None
        core.set_delta(slot[0], slot[1], adapter.deltas[name])
    import numpy as np

    for name, pair in adapter.pairs.items():
        _, layer, matrix, _ = name.split(".")
        # the file's precision is kept (exactly its values; F16 or Q8_0 halve or quarter what
        # decode streams per token); a Q8_0 B becomes F32, which holds it exactly
        a = pair.a_q8 if pair.a_q8 is not None else pair.a.astype(
            np.float16 if pair.a_half else np.float32)
        b = pair.b.astype(np.float16 if pair.b_half else np.float32)
        core.set(int(layer), SLOTS[matrix], a, b, adapter.alpha / pair.rank)
    return LoadedAdapter(path, core, len(adapter.pairs), int(core.max_rank))


def _delta_slot(name: str) -> tuple[int, str] | None:
    """(layer, C++ delta slot) of the vector a delta adapts; None when none fits."""
    if name == "output_norm.weight":
        return 0, "output_norm"
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in DELTA_SLOTS:
        return int(parts[1]), DELTA_SLOTS[parts[2]]
    return None


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


__all__ = ["DELTA_SLOTS", "SLOTS", "AdapterSet", "LoadedAdapter", "LoraSpec", "load_adapter",
           "lora_specs"]
