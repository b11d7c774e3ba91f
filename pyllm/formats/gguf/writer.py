"""GGUF v3 writer: metadata + tensors, written atomically (temp file + rename).

Tensors may be given as arrays or as callables that produce the array when the file is
written, so converters can stream one tensor at a time instead of holding the whole model.

The file goes through :func:`pyllm.atomic.atomic_output`: the destination is checked first, the
temp file next to it disappears however the write ends short of SIGKILL (SIGTERM included, as
:class:`pyllm.atomic.WriteTerminated`), and stale temp files of dead writers are removed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from pyllm.atomic import atomic_output
from pyllm.errors import GGUFError
from pyllm.formats.gguf.constants import (
    DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    MAX_DIMS,
    PLAIN_DTYPES,
    SCALAR_DTYPES,
    STRUCT_FORMATS,
    TYPE_INFO,
    GGMLType,
    ValueType,
)

TensorSource = np.ndarray | Callable[[], np.ndarray]

_NUMPY_TO_GGML = {
    np.dtype("float32"): GGMLType.F32,
    np.dtype("float16"): GGMLType.F16,
    np.dtype("float64"): GGMLType.F64,
    np.dtype("int8"): GGMLType.I8,
    np.dtype("int16"): GGMLType.I16,
    np.dtype("int32"): GGMLType.I32,
    np.dtype("int64"): GGMLType.I64,
}

_NUMPY_TO_VALUE = {
    np.dtype("uint8"): ValueType.UINT8,
    np.dtype("int8"): ValueType.INT8,
    np.dtype("uint16"): ValueType.UINT16,
    np.dtype("int16"): ValueType.INT16,
    np.dtype("uint32"): ValueType.UINT32,
    np.dtype("int32"): ValueType.INT32,
    np.dtype("float32"): ValueType.FLOAT32,
    np.dtype("bool"): ValueType.BOOL,
    np.dtype("uint64"): ValueType.UINT64,
    np.dtype("int64"): ValueType.INT64,
    np.dtype("float64"): ValueType.FLOAT64,
}


@dataclass
class _PendingTensor:
    name: str
    ggml_type: GGMLType
    dims: tuple[int, ...]  # ggml order
    nbytes: int
    source: TensorSource


def _infer_scalar_type(value: Any) -> ValueType:
    if isinstance(value, (bool, np.bool_)):
        return ValueType.BOOL
    if isinstance(value, np.generic):
        return _NUMPY_TO_VALUE[value.dtype]
    if isinstance(value, int):
        if 0 <= value < 1 << 32:
            return ValueType.UINT32
        if -(1 << 31) <= value < 0:
            return ValueType.INT32
        if 0 <= value < 1 << 64:
            return ValueType.UINT64
        if -(1 << 63) <= value < 0:
            return ValueType.INT64
        raise GGUFError(f"integer {value} does not fit in 64 bits")
    if isinstance(value, float):
        return ValueType.FLOAT32
    if isinstance(value, str):
        return ValueType.STRING
    if isinstance(value, (list, tuple, np.ndarray)):
        return ValueType.ARRAY
    raise GGUFError(f"cannot store a value of type {type(value).__name__} in GGUF metadata")


def _infer_elem_type(values: Sequence[Any] | np.ndarray) -> ValueType:
    if isinstance(values, np.ndarray):
        try:
            return _NUMPY_TO_VALUE[values.dtype]
        except KeyError:
            raise GGUFError(f"cannot store a numpy array of {values.dtype} in metadata") from None
    if len(values) == 0:
        return ValueType.UINT32
    kinds = {_infer_scalar_type(v) for v in values}
    if kinds <= {ValueType.UINT32, ValueType.INT32}:
        return ValueType.INT32 if ValueType.INT32 in kinds else ValueType.UINT32
    if kinds <= {ValueType.UINT32, ValueType.INT32, ValueType.UINT64, ValueType.INT64}:
        return ValueType.INT64
    if len(kinds) != 1:
        raise GGUFError(f"array mixes value types {sorted(k.name for k in kinds)}")
    return kinds.pop()


class GGUFWriter:
    """Builds a GGUF v3 file.

    >>> w = GGUFWriter("out.gguf")
    >>> w.add_kv("general.architecture", "llama")
    >>> w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    >>> w.write()

    Args:
        path: The file to write (atomically, by :meth:`write`).
        alignment: Alignment of the tensor data (``general.alignment``).
        pad_end: Pad the file to the alignment after the last tensor.
    """

    def __init__(self, path: str | os.PathLike[str], alignment: int = DEFAULT_ALIGNMENT,
                 pad_end: bool = False) -> None:
        """``pad_end``: pad the last tensor's data to the alignment too, as ggml's
        ``gguf_write_to_file`` does (for byte-identical copies of files llama.cpp writes that
        way, such as its importance matrices); by default the file ends where its data ends."""
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"alignment {alignment} is not a positive power of two")
        self.path = os.fspath(path)
        self.alignment = alignment
        self.pad_end = pad_end
        self._kv: dict[str, tuple[ValueType, ValueType | None, Any]] = {}
        self._tensors: list[_PendingTensor] = []
        self._names: set[str] = set()
        if alignment != DEFAULT_ALIGNMENT:
            self.add_kv("general.alignment", alignment, ValueType.UINT32)

    # ---- metadata -----------------------------------------------------------------------------

    def add_kv(
        self,
        key: str,
        value: Any,
        vtype: ValueType | None = None,
        elem_type: ValueType | None = None,
    ) -> None:
        """Add one metadata entry; types are inferred unless given (ints -> UINT32/INT32...).

        Args:
            key: The key (unique in the file).
            value: A number, bool, str, or a list / numpy array of one of them.
            vtype: The GGUF value type (default: inferred).
            elem_type: The element type of an array value (default: inferred).
        """
        if not key:
            raise GGUFError("metadata keys must not be empty")
        if key in self._kv:
            raise GGUFError(f"duplicate metadata key {key!r}")
        vtype = ValueType(vtype) if vtype is not None else _infer_scalar_type(value)
        if vtype == ValueType.ARRAY and elem_type is None:
            elem_type = _infer_elem_type(value)
        self._kv[key] = (vtype, elem_type, value)

    def add_metadata(self, metadata: dict[str, Any],
                     value_types: dict[str, tuple[ValueType, ValueType | None]] | None = None
                     ) -> None:
        """Add many entries, e.g. ``reader.metadata`` with ``reader.value_types`` to copy a file.

        Args:
            metadata: Key -> value, in order.
            value_types: Key -> (value type, element type) to keep each value's exact GGUF type.
        """
        for key, value in metadata.items():
            if key == "general.alignment" and key in self._kv:
                continue
            vt, et = (value_types or {}).get(key, (None, None))
            self.add_kv(key, value, vt, et)

    # ---- tensors ------------------------------------------------------------------------------

    def add_tensor(
        self,
        name: str,
        data: TensorSource,
        ggml_type: GGMLType | int | None = None,
        dims: Sequence[int] | None = None,
    ) -> None:
        """Add a tensor.

        For plain types pass a numpy array (its dtype picks the type unless ``ggml_type`` is given;
        ``dims`` defaults to the reversed numpy shape). For block-quantized types pass the packed
        bytes (uint8) with ``ggml_type`` and ``dims`` (ggml order). ``data`` may be a callable
        returning the array, evaluated only while writing (then ``ggml_type`` and ``dims`` are
        required).

        Args:
            name: The tensor name (unique in the file).
            data: A numpy array, packed block bytes, or a callable returning either.
            ggml_type: The tensor type (default: from the dtype).
            dims: The dimensions in ggml order (default: the reversed numpy shape).
        """
        if not name:
            raise GGUFError("tensor names must not be empty")
        if name in self._names:
            raise GGUFError(f"duplicate tensor name {name!r}")
        if callable(data) and not isinstance(data, np.ndarray):
            if ggml_type is None or dims is None:
                raise GGUFError(f"tensor {name!r}: a lazy tensor needs ggml_type and dims")
            gtype = GGMLType(ggml_type)
            tdims = tuple(int(d) for d in dims)
        else:
            arr = np.asarray(data)
            if ggml_type is None:
                if arr.dtype not in _NUMPY_TO_GGML:
                    raise GGUFError(f"tensor {name!r}: cannot infer a ggml type from {arr.dtype}")
                gtype = _NUMPY_TO_GGML[arr.dtype]
            else:
                gtype = GGMLType(ggml_type)
            tdims = tuple(int(d) for d in dims) if dims is not None else tuple(reversed(arr.shape))
            data = arr
        if not 1 <= len(tdims) <= MAX_DIMS or any(d <= 0 for d in tdims):
            raise GGUFError(f"tensor {name!r}: bad dims {list(tdims)}")
        info = TYPE_INFO[gtype]
        if tdims[0] % info.block_size:
            raise GGUFError(
                f"tensor {name!r}: row length {tdims[0]} is not a multiple of the "
                f"{gtype.name} block size {info.block_size}"
            )
        n = int(np.prod(tdims, dtype=np.int64))
        nbytes = n // info.block_size * info.type_size
        if isinstance(data, np.ndarray) and data.nbytes != nbytes:
            raise GGUFError(
                f"tensor {name!r}: {data.nbytes} bytes of data for {gtype.name} {list(tdims)} "
                f"which needs {nbytes}"
            )
        self._names.add(name)
        self._tensors.append(_PendingTensor(name, gtype, tdims, nbytes, data))

    # ---- output -------------------------------------------------------------------------------

    def write(self) -> None:
        """Write the file atomically: everything goes to a temp file renamed over ``path``.

        Raises :class:`~pyllm.errors.GGUFError` if ``path`` cannot be written (see
        :func:`pyllm.atomic.check_destination`) and :class:`pyllm.atomic.WriteTerminated` on
        SIGTERM; in every case but SIGKILL the temp file is gone afterwards.
        """
        with atomic_output(self.path, error=GGUFError) as f:
            self._write_to(f)

    def _write_to(self, f: IO[bytes]) -> None:
        f.write(GGUF_MAGIC)
        f.write(struct.pack("<IQQ", 3, len(self._tensors), len(self._kv)))
        for key, (vtype, elem_type, value) in self._kv.items():
            f.write(_encode_string(key))
            f.write(struct.pack("<I", vtype))
            f.write(_encode_value(vtype, elem_type, value, key))
        offset = 0
        for t in self._tensors:
            f.write(_encode_string(t.name))
            f.write(struct.pack("<I", len(t.dims)))
            f.write(struct.pack(f"<{len(t.dims)}Q", *t.dims))
            f.write(struct.pack("<IQ", t.ggml_type, offset))
            offset += -(-t.nbytes // self.alignment) * self.alignment
        _pad(f, self.alignment)
        for i, t in enumerate(self._tensors):
            arr = t.source() if callable(t.source) and not isinstance(t.source, np.ndarray) \
                else t.source
            arr = _as_tensor_bytes(np.asarray(arr), t)
            f.write(memoryview(arr).cast("B"))
            del arr
            if i == 0:
                _test_gate()
            # No padding after the last tensor: the file ends where its data ends, so any
            # truncation of a file we wrote is detectable.
            if i + 1 < len(self._tensors) or self.pad_end:
                _pad(f, self.alignment)


def _test_gate() -> None:
    """Test hook, run once the first tensor is in the temp file. With
    ``PYLLM_TEST_WRITE_GATE=R:G`` (two pipe file descriptors the test process passed down), write
    one byte to R and wait for a byte (or EOF) on G, so a test can signal the writer at a known
    point of a write instead of guessing with sleeps."""
    spec = os.environ.get("PYLLM_TEST_WRITE_GATE")
    if not spec:
        return
    ready, go = (int(x) for x in spec.split(":"))
    os.write(ready, b"1")
    os.read(go, 1)


def _pad(f: IO[bytes], alignment: int) -> None:
    pos = f.tell()
    pad = -pos % alignment
    if pad:
        f.write(b"\0" * pad)


def _as_tensor_bytes(arr: np.ndarray, t: _PendingTensor) -> np.ndarray:
    plain = PLAIN_DTYPES.get(t.ggml_type)
    if plain is not None and arr.dtype != np.uint8:
        arr = arr.astype(plain, copy=False)
    arr = np.ascontiguousarray(arr)
    if arr.nbytes != t.nbytes:
        raise GGUFError(
            f"tensor {t.name!r}: produced {arr.nbytes} bytes, expected {t.nbytes}"
        )
    return arr.reshape(-1).view(np.uint8)


def _encode_string(s: str) -> bytes:
    raw = s.encode("utf-8", errors="surrogateescape")
    return struct.pack("<Q", len(raw)) + raw


def _encode_value(vtype: ValueType, elem_type: ValueType | None, value: Any, key: str) -> bytes:
    if vtype == ValueType.STRING:
        if not isinstance(value, str):
            raise GGUFError(f"{key!r}: expected a string, got {type(value).__name__}")
        return _encode_string(value)
    if vtype == ValueType.ARRAY:
        assert elem_type is not None
        head = struct.pack("<IQ", elem_type, len(value))
        if elem_type == ValueType.STRING:
            return head + b"".join(_encode_string(s) for s in value)
        if elem_type == ValueType.ARRAY:
            parts = []
            for sub in value:
                parts.append(_encode_value(ValueType.ARRAY, _infer_elem_type(sub), sub, key))
            return head + b"".join(parts)
        try:
            arr = np.asarray(value).astype(SCALAR_DTYPES[elem_type], casting="unsafe")
        except (TypeError, ValueError) as e:
            raise GGUFError(f"{key!r}: cannot encode array as {elem_type.name}: {e}") from None
        return head + arr.tobytes()
    try:
        return struct.pack(STRUCT_FORMATS[vtype], value)
    except struct.error as e:
        raise GGUFError(f"{key!r}: cannot encode {value!r} as {vtype.name}: {e}") from None
