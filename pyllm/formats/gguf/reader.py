"""Memory-mapped GGUF reader with complete validation.

The whole file is mapped read-only (``mmap``); metadata is parsed with bounds checks on every
read, and tensor data is exposed as zero-copy views. Parsing needs no numpy: numeric arrays and
tensor data are memoryviews of the mapping (:attr:`GGUFReader.fields`, :attr:`TensorInfo.view`),
with numpy views of them made on first use (:attr:`GGUFReader.metadata`, :attr:`TensorInfo.raw`),
so that loading a model to run it never imports numpy (~45-90 ms of a cold start); string arrays
are walked at parse time and decoded when used (:class:`~pyllm.formats.gguf.StringArray`), so a
vocabulary's 100k+ merges never become Python strings in a process that runs the model. Every
way a file can be malformed raises :class:`~pyllm.errors.GGUFError` naming what is wrong and
where. Counts and lengths read from the header are checked against the bytes actually left in the
file *before* anything is allocated for them, so a hostile header cannot make the reader allocate
more than the file size.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pyllm._native import optional_core
from pyllm.errors import GGUFError
from pyllm.formats.gguf.constants import (
    DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    MAX_DIMS,
    PLAIN_DTYPES,
    STRUCT_FORMATS,
    SUPPORTED_VERSIONS,
    TYPE_INFO,
    GGMLType,
    ValueType,
)
from pyllm.formats.gguf.strings import StringArray, decode_string

if TYPE_CHECKING:
    import numpy as np

# Smallest number of bytes one encoded item can take; used to reject counts that cannot fit.
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
_MIN_ARRAY_BYTES = 4 + 8  # element type + count
_MAX_DIM = 1 << 62  # dimensions are u64 on disk but int64 in ggml; anything larger is bogus
_MAX_NESTING = 8  # nested arrays deeper than this are not something a real file does
_FOLIO_MAX = 2 << 20  # largest page-cache folio a fault maps at once (one PMD on x86-64 / arm64 4K)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file and a zero-copy view of its data."""

    name: str
    type: GGMLType
    dims: tuple[int, ...]  # ggml order: dims[0] is the innermost (contiguous) dimension
    offset: int  # absolute byte offset of the data in the file
    nbytes: int
    view: memoryview = field(repr=False)  # the tensor's bytes in the mapping (read-only)

    @property
    def raw(self) -> np.ndarray:
        """Flat uint8 numpy view of the tensor's bytes (zero-copy, read-only)."""
        import numpy as np

        return np.frombuffer(self.view, dtype=np.uint8)

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (outermost first): the reverse of ``dims``."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def data(self) -> np.ndarray:
        """Typed view for plain types (numpy shape), else uint8 rows of packed blocks."""
        dtype = PLAIN_DTYPES.get(self.type)
        if dtype is not None:
            return self.raw.view(dtype).reshape(self.shape)
        info = TYPE_INFO[self.type]
        row_bytes = self.dims[0] // info.block_size * info.type_size
        return self.raw.reshape(*self.shape[:-1], row_bytes)


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf: memoryview, path: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def fail(self, what: str, at: int | None = None) -> GGUFError:
        return GGUFError(f"{self.path}: at byte {self.pos if at is None else at}: {what}")

    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.remaining():
            raise self.fail(
                f"{what} needs {n} bytes but only {self.remaining()} remain "
                f"(file is {self.size} bytes; truncated or corrupt)"
            )

    def unpack(self, fmt: str, what: str) -> int | float:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return int(self.unpack("<I", what))

    def u64(self, what: str) -> int:
        return int(self.unpack("<Q", what))

    def string(self, what: str) -> str:
        start = self.pos
        length = self.u64(f"length of {what}")
        self.need(length, f"{what} (declared length {length})")
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        if what.startswith("key"):
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise self.fail(f"{what} is not valid UTF-8", at=start) from None
        return decode_string(raw)

    def string_array(self, count: int, what: str) -> list[str]:
        """``count`` strings, decoded (a nested array's; the top-level ones become
        :class:`StringArray`)."""
        start = self.pos
        self.skip_strings(count, what)
        return StringArray(self.buf, start, count).tolist()

    def skip_strings(self, count: int, what: str) -> None:
        """Move past ``count`` strings, checking each lies inside the file; the hot loop of
        vocabulary loading (100k+ tokens and merges). The extension walks them ~10x faster
        where it is there; this loop runs otherwise, and words the error where that finds one."""
        walk = optional_core("gguf_string_array_end")
        end = None if walk is None else walk(self.buf, self.pos, count)
        if end is not None:
            self.pos = end
            return
        view, size, pos = self.buf, self.size, self.pos
        unpack = struct.unpack_from
        for i in range(count):
            if size - pos < 8:
                self.pos = pos
                raise self.fail(f"length of element {i} of {what} runs past the end of the file")
            (length,) = unpack("<Q", view, pos)
            pos += 8
            if length > size - pos:
                self.pos = pos
                raise self.fail(f"element {i} of {what} (declared length {length}) runs past "
                                f"the end of the file")
            pos += length
        self.pos = pos

    def array_view(self, fmt: str, count: int, what: str) -> memoryview:
        """``count`` elements of struct format ``fmt`` (little-endian, as GGUF and every
        supported host) as a typed zero-copy memoryview."""
        fmt = fmt.lstrip("<")
        itemsize = struct.calcsize(fmt)
        if count > self.remaining() // itemsize:
            raise self.fail(
                f"{what}: {count} elements of {itemsize} bytes do not fit in the "
                f"{self.remaining()} bytes left"
            )
        view = self.buf[self.pos : self.pos + count * itemsize].cast(fmt)
        self.pos += count * itemsize
        return view


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one file's contents from another's at a path: device, inode, size, mtime
    (the reader's check that a file opened again is the one mapped; the repack cache's key)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _shortest_float32(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (1e-05, not 9.99999974e-06):
    the number the file's writer meant. The correctly rounded value of the fewest digits that
    round-trips is the one (numpy's str of a float32 gives the same)."""
    if math.isnan(value) or math.isinf(value):
        return value
    pack, unpack = struct.pack, struct.unpack
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if unpack("<f", pack("<f", candidate))[0] == value:
            return candidate
    return value


def _value_type(raw: int, cur: _Cursor, where: str) -> ValueType:
    try:
        return ValueType(raw)
    except ValueError:
        raise cur.fail(f"{where}: unknown metadata value type {raw}", at=cur.pos - 4) from None


_Reader = TypeVar("_Reader", bound="TensorLookup")


def _numpy_value(value: Any) -> Any:
    """A :attr:`GGUFReader.fields` value as :attr:`GGUFReader.metadata` gives it: numeric arrays
    as read-only numpy arrays (zero-copy; bools normalised to True/False), string arrays as
    lists, the rest as is."""
    if isinstance(value, memoryview):
        import numpy as np

        if value.format == "?":
            return np.asarray(value.cast("B")).astype(bool)
        return np.asarray(value)
    if isinstance(value, StringArray):
        return value.tolist()
    if _holds_arrays(value):
        return [_numpy_value(v) for v in value]
    return value


def _holds_arrays(value: Any) -> bool:
    # arrays are homogeneous: the first element says what the others are
    return isinstance(value, list) and bool(value) and isinstance(value[0], (list, memoryview))


class TensorLookup:
    """What a model reader offers besides its fields (``path``, ``fields``, ``tensors`` and
    ``_by_name``, set by the reader): metadata with numpy arrays, tensors by name, metadata by
    key, iteration, ``with``. Shared by :class:`GGUFReader` and
    :class:`~pyllm.formats.gguf.split.SplitGGUFReader`."""

    path: str
    fields: dict[str, Any]
    tensors: list[TensorInfo]
    _by_name: dict[str, TensorInfo]

    @functools.cached_property
    def metadata(self) -> dict[str, Any]:
        """key -> value: :attr:`fields` with numeric arrays as read-only numpy arrays
        (zero-copy views of the file)."""
        return {key: _numpy_value(value) for key, value in self.fields.items()}

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor named {name!r}") from None

    def has_tensor(self, name: str) -> bool:
        return name in self._by_name

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value (as :attr:`metadata` gives it), or ``default``."""
        if key not in self.fields:
            return default
        value = self.fields[key]
        if isinstance(value, StringArray):
            return value.tolist()  # not via metadata, which would decode every array
        return self.metadata[key] if isinstance(value, memoryview) or _holds_arrays(value) \
            else value

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors)

    def close(self) -> None:
        """Drop this reader's references to the mapping (views handed out stay valid)."""
        self.tensors = []
        self._by_name = {}

    def __enter__(self: _Reader) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GGUFReader(TensorLookup):
    """Reads and validates a GGUF v2/v3 file.

    Attributes:
        path: the file path.
        version: GGUF version (2 or 3).
        fields: key -> value as parsed. Scalars are Python ``int``/``float``/``bool``, strings
            ``str``, arrays of strings :class:`~pyllm.formats.gguf.StringArray` (read from
            the file when used; ``list[str]`` inside arrays of arrays), numeric arrays typed
            read-only memoryviews of the file (format ``"?"`` for bools), arrays of arrays
            Python lists.
        metadata: as ``fields``, with numeric arrays as read-only numpy arrays (zero-copy) and
            string arrays as ``list[str]``.
        value_types: key -> (value type, element type or None for non-arrays), for round trips.
        tensors: list of :class:`TensorInfo` in file order.
        alignment: data alignment in bytes.
        data_offset: absolute offset of the tensor data section.

    Args:
        path: The GGUF file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open: {e.strerror or e}") from None
        if size < 4:
            raise GGUFError(f"{self.path}: file is {size} bytes, too short to be GGUF")
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._identity = file_identity(os.fstat(f.fileno()))
        except (OSError, ValueError) as e:
            raise GGUFError(f"{self.path}: cannot map file: {e}") from None
        # every view handed out (tensors, arrays) is a slice of this one; the mapping lives as
        # long as any of them does
        self._buf = memoryview(self._map)
        self.fields: dict[str, Any] = {}
        self.value_types: dict[str, tuple[ValueType, ValueType | None]] = {}
        self.tensors: list[TensorInfo] = []
        self._by_name: dict[str, TensorInfo] = {}
        self._parse()

    # ---- public helpers (and TensorLookup's) ---------------------------------------------------

    @property
    def file_size(self) -> int:
        return len(self._buf)

    def open_tensor_file(self, name: str) -> tuple[int, int] | None:
        """A new read-only descriptor of this file and the offset of tensor ``name`` in it, for
        reading the tensor's bytes without mapping them (a model reads its embedding rows so:
        csrc/model/embedding_file.h). The caller closes the descriptor.

        Args:
            name: A tensor of this file.

        Returns:
            (descriptor, offset), or None when the file cannot be opened again or is no longer
            the one mapped (replaced or written since).

        Raises:
            GGUFError: No tensor ``name``.
        """
        info = self.tensor(name)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        if file_identity(os.fstat(fd)) != self._identity:
            os.close(fd)
            return None
        return fd, info.offset

    def release_pages(self, *, header_only: bool = False) -> None:
        """Hand this file's pages back to the page cache: they leave the process's resident
        memory and are read from the cache again when a view of them is next used. After a
        load, nothing of the file needs to stay resident: the header is parsed into Python
        objects and the model holds or reads what it needs (a small model's file is otherwise
        a few MB of header, norm vectors and whatever the kernel mapped around them). With
        ``header_only``, what reading the header mapped: a fault maps the pages around it
        (64 KB of fault-around, or a whole page-cache folio, naturally aligned and at most
        2 MiB), so the range runs to the 2 MiB boundary after the header; data pages dropped
        with it come back from the cache when used.

        Args:
            header_only: Only the metadata and tensor infos (and what reading them mapped).
        """
        if not hasattr(self._map, "madvise"):  # no madvise on this platform
            return
        end = len(self._map)
        if header_only:
            end = min(end, -(-self.data_offset // _FOLIO_MAX) * _FOLIO_MAX)
        if end:
            self._map.madvise(mmap.MADV_DONTNEED, 0, end)

    # ---- parsing ------------------------------------------------------------------------------

    def _parse(self) -> None:
        cur = _Cursor(self._buf, self.path)
        magic = bytes(self._buf[:4])
        if magic != GGUF_MAGIC:
            raise cur.fail(f"bad magic {magic!r}, expected {GGUF_MAGIC!r} (not a GGUF file)", at=0)
        cur.pos = 4
        version = cur.u32("version")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in SUPPORTED_VERSIONS:
                raise cur.fail("big-endian GGUF files are not supported", at=4)
            raise cur.fail(
                f"unsupported GGUF version {version} (supported: "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))})",
                at=4,
            )
        self.version = version
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata key/value count")
        if n_kv > cur.remaining() // _MIN_KV_BYTES:
            raise cur.fail(f"metadata count {n_kv} cannot fit in the {cur.remaining()} bytes left")
        if n_tensors > cur.remaining() // _MIN_TENSOR_INFO_BYTES:
            raise cur.fail(
                f"tensor count {n_tensors} cannot fit in the {cur.remaining()} bytes left")

        for i in range(n_kv):
            self._read_kv(cur, i)

        alignment = self._alignment(cur)
        self.alignment = alignment

        infos = [self._read_tensor_info(cur, i) for i in range(n_tensors)]
        data_offset = -(-cur.pos // alignment) * alignment
        self.data_offset = data_offset
        self._place_tensors(cur, infos, data_offset)

    def _read_kv(self, cur: _Cursor, index: int) -> None:
        start = cur.pos
        key = cur.string(f"key of metadata entry {index}")
        if not key:
            raise cur.fail(f"metadata entry {index} has an empty key", at=start)
        if key in self.fields:
            raise cur.fail(f"duplicate metadata key {key!r}", at=start)
        vtype = _value_type(cur.u32(f"value type of {key!r}"), cur, f"key {key!r}")
        elem_type: ValueType | None = None
        if vtype == ValueType.ARRAY:
            value, elem_type = self._read_array(cur, key, depth=0)
        else:
            value = self._read_scalar(cur, vtype, key)
        self.fields[key] = value
        self.value_types[key] = (vtype, elem_type)

    def _read_scalar(self, cur: _Cursor, vtype: ValueType, where: str) -> Any:
        if vtype == ValueType.STRING:
            return cur.string(f"string value of {where!r}")
        value = cur.unpack(STRUCT_FORMATS[vtype], f"{vtype.name} value of {where!r}")
        if vtype == ValueType.BOOL:
            return bool(value)
        if vtype == ValueType.FLOAT32:
            return _shortest_float32(value)
        return value

    def _read_array(self, cur: _Cursor, key: str, depth: int) -> tuple[Any, ValueType]:
        if depth > _MAX_NESTING:
            raise cur.fail(f"{key!r}: arrays nested deeper than {_MAX_NESTING} levels")
        elem_type = _value_type(cur.u32(f"array element type of {key!r}"), cur, f"key {key!r}")
        count = cur.u64(f"array length of {key!r}")
        if elem_type == ValueType.STRING:
            if count > cur.remaining() // 8:
                raise cur.fail(
                    f"{key!r}: array of {count} strings cannot fit in the {cur.remaining()} "
                    "bytes left"
                )
            if depth:
                return cur.string_array(count, repr(key)), elem_type
            start = cur.pos
            cur.skip_strings(count, repr(key))
            return StringArray(cur.buf, start, count), elem_type
        if elem_type == ValueType.ARRAY:
            if count > cur.remaining() // _MIN_ARRAY_BYTES:
                raise cur.fail(
                    f"{key!r}: array of {count} arrays cannot fit in the {cur.remaining()} "
                    "bytes left"
                )
            return [self._read_array(cur, key, depth + 1)[0] for _ in range(count)], elem_type
        fmt = "?" if elem_type == ValueType.BOOL else STRUCT_FORMATS[elem_type]
        return cur.array_view(fmt, count, f"array {key!r}"), elem_type

    def _alignment(self, cur: _Cursor) -> int:
        if "general.alignment" not in self.fields:
            return DEFAULT_ALIGNMENT
        value = self.fields["general.alignment"]
        vtype = self.value_types["general.alignment"][0]
        if vtype not in (ValueType.UINT32, ValueType.UINT64, ValueType.INT32, ValueType.UINT16):
            raise cur.fail(f"general.alignment must be an unsigned integer, got {vtype.name}")
        if value <= 0 or value & (value - 1):
            raise cur.fail(f"general.alignment {value} is not a positive power of two")
        if value > 1 << 20:
            raise cur.fail(f"general.alignment {value} is unreasonably large")
        return int(value)

    def _read_tensor_info(
        self, cur: _Cursor, index: int
    ) -> tuple[str, GGMLType, tuple[int, ...], int, int]:
        start = cur.pos
        name = cur.string(f"name of tensor {index}")
        if not name:
            raise cur.fail(f"tensor {index} has an empty name", at=start)
        where = f"tensor {name!r}"
        n_dims = cur.u32(f"n_dims of {where}")
        if n_dims == 0 or n_dims > MAX_DIMS:
            raise cur.fail(f"{where}: n_dims is {n_dims}, must be 1..{MAX_DIMS}")
        dims = tuple(cur.u64(f"dimension {d} of {where}") for d in range(n_dims))
        for d, ne in enumerate(dims):
            if ne == 0:
                raise cur.fail(f"{where}: dimension {d} is zero")
            if ne >= _MAX_DIM:
                raise cur.fail(f"{where}: dimension {d} is {ne}, negative or absurdly large")
        raw_type = cur.u32(f"type of {where}")
        try:
            ggml_type = GGMLType(raw_type)
        except ValueError:
            raise cur.fail(f"{where}: unknown ggml type {raw_type}", at=cur.pos - 4) from None
        offset = cur.u64(f"data offset of {where}")

        n_elements = 1
        for ne in dims:
            n_elements *= ne
            if n_elements >= _MAX_DIM:
                raise cur.fail(f"{where}: element count overflows (dims {list(dims)})")
        info = TYPE_INFO[ggml_type]
        if dims[0] % info.block_size:
            raise cur.fail(
                f"{where}: row length {dims[0]} is not a whole number of {ggml_type.name} "
                f"blocks of {info.block_size}"
            )
        nbytes = n_elements // info.block_size * info.type_size
        return name, ggml_type, dims, offset, nbytes

    def _place_tensors(
        self,
        cur: _Cursor,
        infos: list[tuple[str, GGMLType, tuple[int, ...], int, int]],
        data_offset: int,
    ) -> None:
        size = cur.size
        if infos and data_offset > size:
            raise cur.fail(f"tensor data section starts at {data_offset}, past the end of the file")
        spans: list[tuple[int, int, str]] = []
        for name, ggml_type, dims, rel, nbytes in infos:
            if name in self._by_name:
                raise GGUFError(f"{self.path}: duplicate tensor name {name!r}")
            if rel % self.alignment:
                raise GGUFError(
                    f"{self.path}: tensor {name!r}: data offset {rel} is not a multiple of the "
                    f"alignment {self.alignment}"
                )
            start = data_offset + rel
            end = start + nbytes
            if end > size:
                raise GGUFError(
                    f"{self.path}: tensor {name!r}: data [{start}, {end}) runs past the end of the "
                    f"file ({size} bytes)"
                )
            spans.append((start, end, name))
            tensor = TensorInfo(
                name=name,
                type=ggml_type,
                dims=dims,
                offset=start,
                nbytes=nbytes,
                view=self._buf[start:end],
            )
            self.tensors.append(tensor)
            self._by_name[name] = tensor
        spans.sort()
        for (_s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:], strict=False):
            if s1 < e0:
                raise GGUFError(
                    f"{self.path}: tensors {n0!r} and {n1!r} overlap (bytes {s1}..{e0})"
                )
