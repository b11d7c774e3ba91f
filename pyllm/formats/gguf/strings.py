"""GGUF string arrays as the reader gives them: walked at parse time, decoded when read.

A vocabulary's tokens and merges are 100k+ strings each; as Python objects they are megabytes
that a model's process would hold for its whole life, while the tokenizer needs the tokens once
and the merges only as bytes (the extension builds the merge table from the file directly). So
:attr:`GGUFReader.fields <pyllm.formats.gguf.GGUFReader.fields>` holds each top-level string
array as a :class:`StringArray`: a read-only sequence over the mapped file, as numeric arrays
are memoryviews of it.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator, Sequence
from typing import Any, overload

from pyllm._native import optional_core


def decode_string(raw: bytes) -> str:
    """A GGUF string's bytes as text. Vocabularies occasionally hold byte sequences that are not
    valid UTF-8; surrogateescape keeps them lossless (the writer encodes them back)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="surrogateescape")


class StringArray(Sequence[str]):
    """A GGUF array of strings in the mapped file, decoded each time it is read (iterate it,
    index it, or ``tolist()`` for a list); compares equal to a list of the same strings.

    The reader checked at parse time that every string lies inside the file, so reading cannot
    fail. ``location`` is (buffer, byte position, count), what the extension's readers take.

    Args:
        buf: The file's mapping (or any buffer holding the array).
        pos: Byte position of the first string (its u64 length) in ``buf``.
        count: Number of strings.
    """

    __slots__ = ("_buf", "_count", "_offsets", "_pos")

    def __init__(self, buf: memoryview, pos: int, count: int) -> None:
        self._buf = buf
        self._pos = pos
        self._count = count
        self._offsets: Sequence[int] | None = None  # each string's start, on first indexing

    @property
    def location(self) -> tuple[memoryview, int, int]:
        return self._buf, self._pos, self._count

    def tolist(self) -> list[str]:
        """Every string, decoded.

        Returns:
            A new list of the array's strings, in order.
        """
        fast = optional_core("gguf_string_array")
        got = None if fast is None else fast(self._buf, self._pos, self._count)
        if got is not None:
            return got[0]  # type: ignore[no-any-return]
        buf, pos = self._buf, self._pos
        out: list[str] = []
        for _ in range(self._count):
            (length,) = struct.unpack_from("<Q", buf, pos)
            out.append(decode_string(buf[pos + 8 : pos + 8 + length].tobytes()))
            pos += 8 + length
        return out

    def find(self, text: str) -> int:
        """Where ``text`` first occurs (nothing is decoded where the extension is there: the
        bytes are compared).

        Args:
            text: The string to look for.

        Returns:
            The index of the first string equal to ``text``, or -1.
        """
        try:
            raw = text.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError:  # a surrogate no decoded string of a file can hold
            return -1
        fast = optional_core("gguf_string_find")
        got = None if fast is None else fast(self._buf, self._pos, self._count, raw)
        if got is not None:
            return got  # type: ignore[no-any-return]
        try:
            return self.tolist().index(text)
        except ValueError:
            return -1

    def first_duplicate(self) -> tuple[int, int] | None:
        """The first repeated string (compared as bytes where the extension is there).

        Returns:
            ``(i, j)``, ``i < j``, of the first string ``j`` equal to an earlier one ``i``;
            None when all differ.
        """
        fast = optional_core("gguf_string_duplicate")
        got = None if fast is None else fast(self._buf, self._pos, self._count)
        if got is not None or fast is not None:
            return got  # type: ignore[no-any-return]
        seen: dict[str, int] = {}
        for j, text in enumerate(self.tolist()):
            i = seen.setdefault(text, j)
            if i != j:
                return i, j
        return None

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[str]:
        return iter(self.tolist())

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self._count))]
        if not -self._count <= i < self._count:
            raise IndexError("string array index out of range")
        if self._offsets is None:
            self._offsets = self._find_offsets()
        pos = self._offsets[i % self._count]
        (length,) = struct.unpack_from("<Q", self._buf, pos)
        return decode_string(self._buf[pos + 8 : pos + 8 + length].tobytes())

    def _find_offsets(self) -> Sequence[int]:
        """Where each string starts (8 bytes a string: a vocabulary's ids index by these)."""
        fast = optional_core("gguf_string_offsets")
        got = None if fast is None else fast(self._buf, self._pos, self._count)
        if got is not None:
            return memoryview(got).cast("Q")
        offsets, pos = array("Q"), self._pos
        for _ in range(self._count):
            offsets.append(pos)
            pos += 8 + struct.unpack_from("<Q", self._buf, pos)[0]
        return offsets

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StringArray):
            return self.tolist() == other.tolist()
        if isinstance(other, (list, tuple)):
            return len(other) == self._count and self.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = self[:3]
        more = f", ... {self._count - 3} more" if self._count > 3 else ""
        return f"StringArray({head!r}{more})"

    def __reduce__(self) -> tuple[Any, ...]:
        return list, (self.tolist(),)  # pickles (and deep-copies) as the list it reads as
