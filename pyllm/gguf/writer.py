"""GGUF v3 writer: metadata + tensors, written atomically (temp file + rename).

Tensors may be given as arrays or as callables that produce the array when the file is
written, so converters can stream one tensor at a time instead of holding the whole model.

The temp file sits next to the output as ``.OUT.gguf.pyllm-tmp-<pid>-<random>`` and holds an
exclusive ``flock`` while it is written. It disappears however the write ends short of SIGKILL:
an exception or Ctrl-C (KeyboardInterrupt) removes it, and so does SIGTERM, which
:meth:`GGUFWriter.write` turns into :class:`WriteTerminated` (a ``SystemExit`` with code 143,
128 + SIGTERM, the status a shell reports for a SIGTERM death) for the duration of the write
when the program has not installed its own SIGTERM handler. A SIGKILLed writer leaves its temp
file behind; the next write into that folder removes every pyllm temp file whose process is
gone (its PID is not running and its lock is free), never one a live process is writing.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import stat
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: no flock; the PID check alone decides
    fcntl = None  # type: ignore[assignment]

import numpy as np

from pyllm.errors import GGUFError
from pyllm.gguf.constants import (
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
    """

    def __init__(self, path: str | os.PathLike[str], alignment: int = DEFAULT_ALIGNMENT) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"alignment {alignment} is not a positive power of two")
        self.path = os.fspath(path)
        self.alignment = alignment
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
        """Add one metadata entry; types are inferred unless given (ints -> UINT32/INT32...)."""
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
        """Add many entries, e.g. ``reader.metadata`` with ``reader.value_types`` to copy a file."""
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
        :func:`check_destination`) and :class:`WriteTerminated` on SIGTERM (see the module
        docstring); in every case but SIGKILL the temp file is gone afterwards.
        """
        check_destination(self.path)
        directory = os.path.dirname(os.path.abspath(self.path))
        remove_stale_temp_files(directory)
        with _sigterm_exits():
            tmp = os.path.join(directory, temp_name(self.path))
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
                fd = os.open(tmp, flags, 0o666)  # the umask applies, as for a plain open()
            except OSError as e:
                raise GGUFError(f"cannot write {self.path}: {e.strerror}") from None
            try:
                if fcntl is not None:
                    # held until the fd closes, so a later run can tell this file is in use
                    # (a file system without flock leaves the PID check to decide)
                    with contextlib.suppress(OSError):
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                with os.fdopen(fd, "wb") as f:
                    self._write_to(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

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
            if i + 1 < len(self._tensors):
                _pad(f, self.alignment)


# ---- destination checks, temp files, SIGTERM -----------------------------------------------------

TEMP_MARK = ".pyllm-tmp-"
# ".OUT.gguf.pyllm-tmp-<pid>-<hex>": the PID says whose it is, the random part keeps two writers
# in one process (threads) apart.
_TEMP_RE = re.compile(r"^\..+" + re.escape(TEMP_MARK) + r"(\d+)-[0-9a-f]+$")
TERMINATED_EXIT_CODE = 128 + signal.SIGTERM  # 143


class WriteTerminated(SystemExit):
    """SIGTERM arrived during :meth:`GGUFWriter.write`; the temp file has been removed. A
    ``SystemExit`` (code 143), so a program that does not catch it exits as SIGTERM asked."""

    def __init__(self) -> None:
        super().__init__(TERMINATED_EXIT_CODE)


def temp_name(path: str | os.PathLike[str]) -> str:
    """The hidden name this process gives the temp file of ``path`` (in the same folder)."""
    base = os.path.basename(os.fspath(path))[:200]  # the additions must fit NAME_MAX (255)
    return f".{base}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def check_destination(path: str | os.PathLike[str],
                      sources: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Raise :class:`~pyllm.errors.GGUFError` unless a file can be written at ``path``: its
    folder exists and is writable, ``path`` is not a folder or a device, and it is none of
    ``sources`` (the files being read). Cheap, so callers run it before any real work."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(directory):
        raise GGUFError(f"cannot write {path}: the folder {directory} does not exist")
    if not os.path.isdir(directory):
        raise GGUFError(f"cannot write {path}: {directory} is not a folder")
    if os.path.isdir(path):
        raise GGUFError(f"cannot write {path}: it is a folder (give the output file's name)")
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise GGUFError(f"cannot write {path}: it exists and is not a regular file")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise GGUFError(f"cannot write {path}: the folder {directory} is not writable")
    for src in sources:
        if _same_file(path, os.fspath(src)):
            raise GGUFError(f"cannot write {path}: it is the input file; choose another name")


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def remove_stale_temp_files(directory: str | os.PathLike[str]) -> list[str]:
    """Remove the temp files that dead pyllm writers left in ``directory``; returns their paths.

    A file counts as stale when its PID is not a running process and nobody holds its lock:
    the PID alone could be another PID namespace's (a container sharing the folder), and the
    lock alone would fail open on file systems without ``flock``.
    """
    removed: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_running(pid) or _locked(entry.path):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(entry.path)
    return removed


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's live process (or a PID we cannot judge): keep the file
    try:  # a zombie (killed, not yet reaped by its parent) writes nothing any more
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _locked(path: str) -> bool:
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return True  # cannot look: leave it alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the lock we may have taken
    return False


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """While the temp file exists, SIGTERM raises :class:`WriteTerminated` in the main thread,
    so the ``except BaseException`` of :meth:`GGUFWriter.write` removes the file, as it does for
    Ctrl-C. Only where SIGTERM still has its default action (it would kill the process with
    the file left behind): a program's own handler is left in charge."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut cleanup
        raise WriteTerminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
