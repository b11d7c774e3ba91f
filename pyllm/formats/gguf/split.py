"""Split GGUF models (llama.cpp's ``gguf-split`` layout): reading one as if it were one file.

A model split in N shards is N GGUF files named ``PREFIX-00001-of-0000N.gguf`` ..
``PREFIX-0000N-of-0000N.gguf``. Every shard carries ``split.no`` (its 0-based index, u16),
``split.count`` (N, u16) and ``split.tensors.count`` (the model's tensor count, i32); the first
also carries all of the model's metadata, and each holds a run of the model's tensors (in the
model's order) in its own data section.

:func:`open_gguf` opens a model file: a plain GGUF gives a :class:`GGUFReader`; any shard of a
split model gives a :class:`SplitGGUFReader` over all of them (the first shard's metadata, the
tensors of every shard in order, each a zero-copy view into its own shard's mapping). Before
anything is used it checks that every shard is there under its name, says it is the shard its
name says, agrees on the count and the model's tensor count, and that the tensors add up with
no name twice; a shard that does not belong (another split of the same name, a renamed or
reordered file) is a :class:`~pyllm.errors.GGUFError` naming the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pyllm.errors import GGUFError
from pyllm.formats.gguf.constants import ValueType
from pyllm.formats.gguf.reader import GGUFReader, TensorInfo, TensorLookup

KEY_NO = "split.no"
KEY_COUNT = "split.count"
KEY_TENSORS = "split.tensors.count"
SPLIT_KEYS = (KEY_NO, KEY_COUNT, KEY_TENSORS)
MAX_SHARDS = 99999  # five digits in the file names
_NAME = re.compile(r"(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")


def shard_name(prefix: str, no: int, count: int) -> str:
    """The file name of shard ``no`` (0-based) of ``count``: ``PREFIX-000NN-of-000MM.gguf``."""
    return f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf"


def parse_shard_name(path: str | os.PathLike[str]) -> tuple[str, int, int] | None:
    """(prefix, 0-based shard index, count) from a shard's file name, or None."""
    m = _NAME.fullmatch(Path(path).name)
    if m is None:
        return None
    return m["prefix"], int(m["no"]) - 1, int(m["count"])


def _split_count(reader: GGUFReader) -> int:
    count = reader.get(KEY_COUNT, 0)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_SHARDS:
        raise GGUFError(f"{reader.path}: {KEY_COUNT} is {count!r}, not a shard count")
    return count


class SplitGGUFReader(TensorLookup):
    """The shards of a split model read as one model (the :class:`GGUFReader` interface that
    loading a model uses): ``fields`` / ``value_types`` / ``alignment`` / ``version`` of the
    first shard without the ``split.*`` keys, ``tensors`` of all shards in order."""

    def __init__(self, shards: list[GGUFReader]) -> None:
        self.shards = shards
        first = shards[0]
        self.path = first.path
        self.paths = [s.path for s in shards]
        self.version = first.version
        self.alignment = first.alignment
        self.fields: dict[str, Any] = {
            k: v for k, v in first.fields.items() if k not in SPLIT_KEYS}
        self.value_types: dict[str, tuple[ValueType, ValueType | None]] = {
            k: v for k, v in first.value_types.items() if k not in SPLIT_KEYS}
        self.tensors: list[TensorInfo] = [t for s in shards for t in s.tensors]
        self._by_name = {t.name: t for t in self.tensors}

    @property
    def file_size(self) -> int:
        return sum(s.file_size for s in self.shards)

    def open_tensor_file(self, name: str) -> tuple[int, int] | None:
        """:meth:`GGUFReader.open_tensor_file` of the shard holding ``name``."""
        self.tensor(name)  # raises GGUFError naming it when no shard has it
        return next(s for s in self.shards if s.has_tensor(name)).open_tensor_file(name)

    def release_pages(self, *, header_only: bool = False) -> None:
        for s in self.shards:
            s.release_pages(header_only=header_only)

    def close(self) -> None:
        for s in self.shards:
            s.close()
        super().close()


ModelFile = GGUFReader | SplitGGUFReader  # what open_gguf gives


def open_gguf(path: str | os.PathLike[str]) -> ModelFile:
    """A model file: a :class:`GGUFReader`, or for any shard of a split model a
    :class:`SplitGGUFReader` over all its shards (checked; see the module doc)."""
    reader = GGUFReader(path)
    try:
        count = _split_count(reader)
        if count <= 1:
            return reader
        return _open_shards(reader, count)
    except BaseException:
        reader.close()
        raise


def _open_shards(given: GGUFReader, count: int) -> SplitGGUFReader:
    parsed = parse_shard_name(given.path)
    no = given.get(KEY_NO)
    if parsed is None:
        raise GGUFError(f"{given.path}: shard {no!r} of a model split in {count}, but its name "
                        f"is not PREFIX-NNNNN-of-{count:05d}.gguf: the other shards cannot be "
                        "found (keep the names gguf-split / pyllm split gave them)")
    prefix, name_no, name_count = parsed
    if name_count != count or name_no != no:
        raise GGUFError(f"{given.path}: its name says shard {name_no + 1} of {name_count}, its "
                        f"header shard {no!r} (0-based) of {count}: a renamed shard?")
    folder = Path(given.path).parent
    wanted = [folder / shard_name(prefix, i, count) for i in range(count)]
    missing = [p.name for p in wanted if not p.is_file()]
    if missing:
        raise GGUFError(f"{given.path}: shard {', '.join(missing)} of the {count} is missing")
    # files of the same prefix from another split (a re-split left beside the old one)
    pattern = re.compile(re.escape(prefix) + r"-\d{5}-of-\d{5}\.gguf")
    extra = sorted(p.name for p in folder.iterdir() if pattern.fullmatch(p.name)
                   and p not in wanted)
    if extra:
        raise GGUFError(f"{folder / extra[0]}: a shard of another split of {prefix!r} beside "
                        f"this one of {count}: remove one set")
    shards: list[GGUFReader] = []
    try:
        for i, p in enumerate(wanted):
            shard = given if Path(p) == Path(given.path) else GGUFReader(p)
            shards.append(shard)
            _check_shard(shard, i, count, shards[0])
        total = shards[0].get(KEY_TENSORS)
        have = sum(len(s.tensors) for s in shards)
        if have != total:
            raise GGUFError(f"{shards[0].path}: {KEY_TENSORS} is {total!r}, the shards hold "
                            f"{have} tensors")
        seen: dict[str, str] = {}
        for s in shards:
            for t in s.tensors:
                if t.name in seen:
                    raise GGUFError(f"{s.path}: tensor {t.name} is also in {seen[t.name]}")
                seen[t.name] = s.path
        return SplitGGUFReader(shards)
    except BaseException:
        for s in shards:
            if s is not given:
                s.close()
        raise


def _check_shard(shard: GGUFReader, index: int, count: int, first: GGUFReader) -> None:
    no, n, total = (shard.get(k) for k in SPLIT_KEYS)
    if n != count:
        raise GGUFError(f"{shard.path}: {KEY_COUNT} is {n!r}, the first shard says {count}: "
                        "a shard of another split?")
    if no != index:
        raise GGUFError(f"{shard.path}: says it is shard {no!r} (0-based), its name makes it "
                        f"{index}: shards renamed or reordered?")
    if total != first.get(KEY_TENSORS) or isinstance(total, bool) or not isinstance(total, int):
        raise GGUFError(f"{shard.path}: {KEY_TENSORS} is {total!r}, the first shard says "
                        f"{first.get(KEY_TENSORS)!r}: a shard of another split?")
    if index > 0 and "general.architecture" in shard.fields and \
            shard.get("general.architecture") != first.get("general.architecture"):
        raise GGUFError(f"{shard.path}: architecture {shard.get('general.architecture')!r}, "
                        f"the first shard's is {first.get('general.architecture')!r}")


__all__ = ["KEY_COUNT", "KEY_NO", "KEY_TENSORS", "SPLIT_KEYS", "ModelFile", "SplitGGUFReader",
           "open_gguf", "parse_shard_name", "shard_name"]
