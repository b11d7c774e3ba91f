"""``pyllm export-lora``: bake LoRA adapters into a base model's GGUF file.

Each adapted matrix is dequantized to float32, ``scale * alpha / rank * B @ A`` of every adapter
that touches it is added (in float64, then rounded once), and the sum is encoded again: in the
base tensor's own type, or in ``out_type`` for every adapted matrix (a type whose block does
not divide the row stays the base's). pyllm's bias and norm deltas are added the same way; a
bias the base lacks is written as a new F32 tensor. Everything else is copied byte for byte,
metadata included. The adapters are read and checked against the base before anything is
written; the output appears atomically (temp file removed on errors, Ctrl-C and SIGTERM).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pyllm.atomic import check_destination
from pyllm.errors import ModelError, QuantError
from pyllm.formats.gguf import GGMLType, GGUFWriter
from pyllm.formats.gguf.constants import TYPE_INFO
from pyllm.formats.gguf.split import open_gguf
from pyllm.formats.lora import AdapterSpec, LoraAdapter, adapter_specs, check_against, read_adapter


def _encode(values: np.ndarray, ttype: GGMLType, name: str) -> np.ndarray:
    from pyllm.formats import qtypes

    if not np.all(np.isfinite(values)):
        raise QuantError(f"{name}: the merged tensor holds NaN or infinite values")
    if ttype == GGMLType.F32:
        return values.astype(np.float32)
    if ttype == GGMLType.F16:
        return values.astype(np.float16)
    return qtypes.quantize(ttype, values)


def export_lora(base: str | os.PathLike[str], adapters: Sequence[AdapterSpec],
                out: str | os.PathLike[str], out_type: str | GGMLType | None = None) -> Path:
    """Write ``out``: ``base`` with ``adapters`` (paths, or (path, scale) pairs) merged in."""
    specs = adapter_specs(adapters)
    if not specs:
        raise ModelError("export-lora needs at least one adapter")
    if os.path.abspath(os.fspath(base)) == os.path.abspath(os.fspath(out)):
        raise ModelError("the output must be a different file from the base model")
    check_destination(out, sources=[base, *(p for p, _ in specs)], error=ModelError)
    dst_type = None if out_type is None else _type_named(out_type)
    reader = open_gguf(base)
    try:
        arch = reader.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelError(f"{base}: no general.architecture")
        shapes = {t.name: t.shape for t in reader.tensors}
        loaded: list[tuple[LoraAdapter, float]] = []
        for path, scale in specs:
            adapter = read_adapter(path)
            check_against(adapter, arch, shapes)
            loaded.append((adapter, scale))
        writer = GGUFWriter(out, alignment=reader.alignment)
        skip = {"general.alignment"}
        writer.add_metadata({k: v for k, v in reader.metadata.items() if k not in skip},
                            reader.value_types)
        for t in reader.tensors:
            touched = [(a, s) for a, s in loaded if t.name in a.pairs or t.name in a.deltas]
            if not touched:
                writer.add_tensor(t.name, lambda t=t: t.raw, t.type, t.dims)
                continue
            ttype = t.type
            if dst_type is not None and t.shape[-1] % TYPE_INFO[dst_type].block_size == 0 \
                    and len(t.shape) == 2:
                ttype = dst_type
            writer.add_tensor(t.name, lambda t=t, touched=touched, ttype=ttype:
                              _encode(_merged(t, touched), ttype, t.name), ttype, t.dims)
        for name, delta in _new_biases(loaded, shapes).items():
            writer.add_tensor(name, delta.astype(np.float32))
        writer.write()
    finally:
        reader.close()
    return Path(out)


def _merged(t: Any, touched: list[tuple[LoraAdapter, float]]) -> np.ndarray:
    from pyllm.formats import qtypes

    values = np.asarray(qtypes.dequantize(t.type, t.raw, t.shape), dtype=np.float64)
    for adapter, scale in touched:
        if t.name in adapter.pairs:
            pair = adapter.pairs[t.name]
            values += adapter.factor(t.name, scale) * (pair.b.astype(np.float64)
                                                       @ pair.a.astype(np.float64))
        if t.name in adapter.deltas:
            values += scale * adapter.deltas[t.name].astype(np.float64)
    return values.astype(np.float32)


def _new_biases(loaded: list[tuple[LoraAdapter, float]], shapes: dict[str, Any]
                ) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for adapter, scale in loaded:
        for name, delta in adapter.deltas.items():
            if name not in shapes:
                out[name] = out.get(name, 0.0) + scale * delta.astype(np.float64)
    return out


def _type_named(t: str | GGMLType) -> GGMLType:
    from pyllm.formats import qtypes

    try:
        return qtypes.resolve_type(t)
    except QuantError as e:
        raise ModelError(f"export-lora output type: {e}") from None


__all__ = ["export_lora"]
