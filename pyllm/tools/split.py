"""``pyllm split`` / ``pyllm merge``: a GGUF model as llama.cpp's ``gguf-split`` shards and back.

Splitting keeps the model's tensors in order and starts a new shard when the next tensor would
take the shard's tensor data past ``max_size`` bytes (each tensor counted with its alignment
padding, as gguf-split counts; a tensor larger than that gets a shard of its own) or when a
shard holds ``max_tensors`` (gguf-split's default, 128, when neither is given). The first shard
carries the model's metadata, every shard ``split.no`` / ``split.count`` / ``split.tensors.count``
(:mod:`pyllm.formats.gguf.split`); names are ``PREFIX-00001-of-0000N.gguf``. Merging writes one
file with the first shard's metadata (without the ``split.*`` keys) and every tensor: the file
that was split, byte for byte, when it was pyllm's or llama.cpp's GGUF.

Tensor bytes are copied from the memory maps, never held whole. Outputs are atomic: every shard
is written to a pyllm temp file first and the set is renamed into place only once all are
complete; an error or a signal removes them (see :mod:`pyllm.atomic`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pyllm.atomic import check_destination, temp_name
from pyllm.errors import GGUFError
from pyllm.formats.gguf import GGUFReader, GGUFWriter, TensorInfo
from pyllm.formats.gguf.constants import ValueType
from pyllm.formats.gguf.split import (
    KEY_COUNT,
    KEY_NO,
    KEY_TENSORS,
    MAX_SHARDS,
    SPLIT_KEYS,
    SplitGGUFReader,
    open_gguf,
    shard_name,
)

DEFAULT_MAX_TENSORS = 128  # gguf-split's
_SIZE = re.compile(r"(?P<n>\d+)(?P<unit>[MG])")


def parse_size(text: str) -> int:
    """``500M`` / ``2G`` -> bytes (decimal units, as gguf-split reads them)."""
    m = _SIZE.fullmatch(text.strip().upper())
    if m is None or int(m["n"]) <= 0:
        raise GGUFError(f"size {text!r}: expected a positive number of M or G, such as 500M or 2G")
    return int(m["n"]) * (1000**2 if m["unit"] == "M" else 1000**3)


def _padded(t: TensorInfo, alignment: int) -> int:
    return -(-t.nbytes // alignment) * alignment


def plan_shards(tensors: list[TensorInfo], alignment: int, max_size: int | None = None,
                max_tensors: int | None = None) -> list[list[TensorInfo]]:
    """The tensors of each shard, in order (see the module doc)."""
    if max_size is not None and max_tensors is not None:
        raise GGUFError("give a maximum size or a maximum tensor count per shard, not both")
    if max_size is None and max_tensors is None:
        max_tensors = DEFAULT_MAX_TENSORS
    if (max_size is not None and max_size <= 0) or (max_tensors is not None and max_tensors <= 0):
        raise GGUFError("the maximum size or tensor count per shard must be positive")
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for t in tensors:
        n = _padded(t, alignment)
        full = (len(shards[-1]) >= max_tensors) if max_tensors is not None else (
            size + n > max_size)  # type: ignore[operator]
        if full and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    if len(shards) > MAX_SHARDS:
        raise GGUFError(f"{len(shards)} shards: more than {MAX_SHARDS} (split.count is a u16 and "
                        "the names have five digits); raise the maximum")
    return shards


def _write_all(writers: list[GGUFWriter], finals: list[Path]) -> list[Path]:
    """Each writer's file written to a pyllm temp name, then all renamed into place."""
    temps: list[str] = []
    try:
        for w in writers:
            temps.append(w.path)
            w.write()
        for tmp, final in zip(temps, finals, strict=True):
            os.replace(tmp, final)
    except BaseException:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
        raise
    return finals


def split_model(src: str | os.PathLike[str], out_prefix: str | os.PathLike[str], *,
                max_size: int | None = None, max_tensors: int | None = None) -> list[Path]:
    """Write ``src`` (one GGUF file) as shards ``OUT_PREFIX-0000i-of-0000N.gguf``; returns their
    paths."""
    prefix = Path(out_prefix)
    if prefix.name == "" or prefix.is_dir():
        raise GGUFError(f"{out_prefix}: give a file name prefix (the shards are PREFIX-00001-of-"
                        "0000N.gguf), not a folder")
    with GGUFReader(src) as reader:
        if reader.get(KEY_COUNT, 0) not in (0, 1):
            raise GGUFError(f"{src} is already a shard of a split model; merge it first")
        plan = plan_shards(reader.tensors, reader.alignment, max_size, max_tensors)
        count = len(plan)
        finals = [prefix.parent / shard_name(prefix.name, i, count) for i in range(count)]
        for f in finals:
            check_destination(f, sources=[src], error=GGUFError)
        metadata = {k: v for k, v in reader.metadata.items() if k not in SPLIT_KEYS}
        writers = []
        for i, tensors in enumerate(plan):
            w = GGUFWriter(prefix.parent / temp_name(finals[i]), alignment=reader.alignment)
            if i == 0:
                w.add_metadata(metadata, reader.value_types)
            w.add_kv(KEY_NO, i, ValueType.UINT16)
            w.add_kv(KEY_COUNT, count, ValueType.UINT16)
            w.add_kv(KEY_TENSORS, len(reader.tensors), ValueType.INT32)
            for t in tensors:
                w.add_tensor(t.name, lambda t=t: t.raw, t.type, t.dims)
            writers.append(w)
        return _write_all(writers, finals)


def merge_model(first: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the split model whose shard ``first`` is (any of them) as one GGUF file ``out``."""
    reader = open_gguf(first)
    with reader:
        if not isinstance(reader, SplitGGUFReader):
            raise GGUFError(f"{first} is not a shard of a split model (no {KEY_COUNT} > 1)")
        check_destination(out, sources=reader.paths, error=GGUFError)
        w = GGUFWriter(out, alignment=reader.alignment)
        w.add_metadata(reader.metadata, reader.value_types)
        for t in reader.tensors:
            w.add_tensor(t.name, lambda t=t: t.raw, t.type, t.dims)
        w.write()
    return Path(out)


__all__ = ["DEFAULT_MAX_TENSORS", "merge_model", "parse_size", "plan_shards", "split_model"]
