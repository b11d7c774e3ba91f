"""Importance matrices: llama.cpp's GGUF imatrix files and its older ``.dat`` files.

An importance matrix says, for every weight matrix of a model, how large the activations that
multiply each of its columns are on some text: per input column ``j`` the sum over tokens of
``x_j ** 2``, and the number of tokens summed. Quantizers use ``sum / count`` (the mean square)
to weight the rounding error of each column (:meth:`Imatrix.weights`).

GGUF layout (what ``llama-imatrix`` writes by default): ``general.type = "imatrix"``,
``imatrix.datasets`` (array of strings: the texts it was computed on), ``imatrix.chunk_count``
and ``imatrix.chunk_size`` (uint32), and per matrix ``W`` (its GGUF tensor name) two F32
tensors: ``W.in_sum2`` with numpy shape ``(n_mat, n_in)`` (the sums; ``n_mat`` is 1 except for
stacked expert matrices) and ``W.counts`` with shape ``(n_mat, 1)``, trailing dimensions of 1
left out as ggml does. Entries are written in sorted name order; pyllm writes the same bytes
as llama.cpp.

Legacy ``.dat`` layout (``llama-imatrix --output-format dat``), little-endian: int32 entry count;
per entry int32 name length, the name, int32 ``ncall`` (chunks), int32 value count, then the
float32 values, which are ``sum / count * ncall`` (so ``values / ncall`` is the mean square);
then optionally int32 chunk count, int32 length and the dataset name. A ``.dat`` holds no token
counts: reading one gives sums and counts scaled by ``chunk_size`` (as llama.cpp does when it
merges one into a new run), which leaves the mean squares exact.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pyllm.atomic import atomic_output, check_destination
from pyllm.errors import GGUFError, QuantError
from pyllm.formats.gguf import GGMLType, GGUFReader, GGUFWriter
from pyllm.formats.gguf.constants import GGUF_MAGIC, ValueType

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUMS, SUFFIX_COUNTS = ".in_sum2", ".counts"
DEFAULT_CHUNK_SIZE = 512  # llama-imatrix's default context (-c), used to scale .dat files

# Sanity limits for untrusted .dat files (a name, a row): far beyond any real model.
_MAX_NAME = 4096
_MAX_VALUES = 1 << 28


@dataclass
class ImatrixEntry:
    """One weight matrix's statistics: ``sums`` (n_mat, n_in) float32 sums of squared
    activations, ``counts`` (n_mat,) int64 token counts."""

    sums: np.ndarray
    counts: np.ndarray

    def mean_squares(self) -> np.ndarray:
        """``sums / counts`` per matrix, float32 (n_mat, n_in); 1 where a matrix saw no token
        (llama.cpp's choice: uniform weights where nothing is known)."""
        out = np.ones_like(self.sums, dtype=np.float32)
        seen = self.counts > 0
        out[seen] = self.sums[seen] / self.counts[seen, None].astype(np.float32)
        return out


@dataclass
class Imatrix:
    """An importance matrix: entries by weight name, and where and how it was computed."""

    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def weights(self, name: str) -> np.ndarray | None:
        """The importance of each input column of weight ``name`` (float32, (n_in,) for a plain
        matrix, (n_mat, n_in) for stacked experts), or None if the matrix has no entry."""
        e = self.entries.get(name)
        if e is None:
            return None
        w = e.mean_squares()
        return w[0] if w.shape[0] == 1 else w

    def add(self, name: str, sums: np.ndarray, n_tokens: int) -> None:
        """Accumulate ``sums`` ((n_in,) or (n_mat, n_in) sums of squares) over ``n_tokens``."""
        s = np.asarray(sums, dtype=np.float32)
        s = s.reshape(1, -1) if s.ndim == 1 else s
        e = self.entries.get(name)
        if e is None:
            self.entries[name] = ImatrixEntry(s.copy(), np.full(s.shape[0], n_tokens, np.int64))
            return
        if e.sums.shape != s.shape:
            raise QuantError(f"importance matrix entry {name!r}: shape {s.shape} does not match "
                             f"{e.sums.shape}")
        e.sums += s
        e.counts += n_tokens

    def merge(self, other: Imatrix) -> None:
        """Add another importance matrix of the same model (llama-imatrix --in-file)."""
        for name, e in other.entries.items():
            mine = self.entries.get(name)
            if mine is None:
                self.entries[name] = ImatrixEntry(e.sums.copy(), e.counts.copy())
                continue
            if mine.sums.shape != e.sums.shape:
                raise QuantError(f"importance matrix entry {name!r}: shape {e.sums.shape} does "
                                 f"not match {mine.sums.shape}")
            mine.sums += e.sums
            mine.counts += e.counts
        self.datasets += other.datasets
        self.chunk_count += other.chunk_count
        self.chunk_size = self.chunk_size or other.chunk_size


# ---- reading ---------------------------------------------------------------------------------


def read_imatrix(path: str | os.PathLike[str],
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> Imatrix:
    """Read a GGUF imatrix or a legacy ``.dat`` file (told apart by the GGUF magic).

    ``chunk_size`` scales a ``.dat`` file's values back into sums and counts (see the module
    doc); the mean squares do not depend on it. Raises :class:`~pyllm.errors.QuantError` for
    anything malformed, naming the file.
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise QuantError(f"cannot read importance matrix {p}: {e.strerror or e}") from None
    if magic == GGUF_MAGIC:
        return _read_gguf(p)
    return _read_dat(p, chunk_size)


def _read_gguf(p: Path) -> Imatrix:
    try:
        with GGUFReader(p) as r:
            kind = r.metadata.get(KEY_TYPE)
            if kind is not None and kind != "imatrix":
                raise QuantError(f"{p}: general.type is {kind!r}, not an importance matrix")
            pairs: dict[str, dict[str, np.ndarray]] = {}
            for t in r.tensors:
                for suffix in (SUFFIX_SUMS, SUFFIX_COUNTS):
                    if t.name.endswith(suffix):
                        if t.type != GGMLType.F32:
                            raise QuantError(f"{p}: tensor {t.name} is {t.type.name}, not F32")
                        data = np.array(t.data, dtype=np.float32).reshape(t.shape)
                        pairs.setdefault(t.name[: -len(suffix)], {})[suffix] = data
            datasets = r.metadata.get(KEY_DATASETS, [])
            chunk_count = r.metadata.get(KEY_CHUNK_COUNT)
            chunk_size = r.metadata.get(KEY_CHUNK_SIZE)
    except GGUFError as e:
        raise QuantError(f"importance matrix {p}: {e}") from None
    if chunk_count is None or chunk_size is None or KEY_DATASETS not in r.metadata:
        # llama-quantize refuses these too: they are not what llama-imatrix writes
        raise QuantError(f"{p}: missing importance matrix metadata ({KEY_DATASETS}, "
                         f"{KEY_CHUNK_COUNT}, {KEY_CHUNK_SIZE})")
    if not pairs:
        raise QuantError(f"{p}: no importance matrix entries")
    im = Imatrix(datasets=[str(d) for d in datasets], chunk_count=int(chunk_count),
                 chunk_size=int(chunk_size))
    for name, pair in sorted(pairs.items()):
        if SUFFIX_SUMS not in pair or SUFFIX_COUNTS not in pair:
            raise QuantError(f"{p}: entry {name} lacks its {SUFFIX_SUMS} or {SUFFIX_COUNTS}")
        sums = pair[SUFFIX_SUMS].reshape(-1, pair[SUFFIX_SUMS].shape[-1])
        counts = pair[SUFFIX_COUNTS].reshape(-1)
        if counts.size != sums.shape[0]:
            raise QuantError(f"{p}: entry {name} has {counts.size} counts for {sums.shape[0]} "
                             "matrices")
        if not (np.isfinite(sums).all() and np.isfinite(counts).all()) or (counts < 0).any():
            raise QuantError(f"{p}: entry {name} holds non-finite or negative values")
        im.entries[name] = ImatrixEntry(sums.copy(), np.rint(counts).astype(np.int64))
    return im


class _DatCursor:
    def __init__(self, data: bytes, p: Path) -> None:
        self.data, self.pos, self.p = data, 0, p

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise QuantError(f"{self.p}: truncated importance matrix ({what} at byte {self.pos})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def i32(self, what: str) -> int:
        return int(struct.unpack("<i", self.take(4, what))[0])


def _read_dat(p: Path, chunk_size: int) -> Imatrix:
    if chunk_size <= 0:
        raise QuantError(f"chunk size must be positive, not {chunk_size}")
    data = p.read_bytes()
    cur = _DatCursor(data, p)
    n = cur.i32("entry count") if len(data) >= 4 else 0
    if n < 1:
        raise QuantError(f"{p}: not an importance matrix (neither GGUF nor a legacy .dat file "
                         "with entries)")
    im = Imatrix(chunk_size=chunk_size)
    for i in range(n):
        length = cur.i32(f"entry {i} name length")
        if not 0 < length <= _MAX_NAME:
            raise QuantError(f"{p}: entry {i} has a bad name length {length}")
        try:
            name = cur.take(length, f"entry {i} name").decode()
        except UnicodeDecodeError:
            raise QuantError(f"{p}: entry {i} name is not UTF-8") from None
        ncall = cur.i32(f"{name} chunk count")
        nval = cur.i32(f"{name} value count")
        if not 0 < nval <= _MAX_VALUES:
            raise QuantError(f"{p}: entry {name} has a bad value count {nval}")
        values = np.frombuffer(cur.take(4 * nval, f"{name} values"), dtype="<f4")
        if not np.isfinite(values).all() or ncall < 0:
            raise QuantError(f"{p}: entry {name} holds non-finite values or a negative count")
        # values = mean square * ncall; as sums and counts over ncall chunks of chunk_size
        # tokens the mean squares stay values / ncall (ncall 0: the values are the means)
        calls = max(ncall, 1)
        im.entries[name] = ImatrixEntry(
            (values.astype(np.float32) * np.float32(chunk_size)).reshape(1, -1),
            np.array([calls * chunk_size], np.int64))
    if cur.pos < len(data):  # optional trailer: chunk count and dataset name
        im.chunk_count = cur.i32("chunk count")
        if cur.pos < len(data):
            length = cur.i32("dataset name length")
            if length > 0:
                im.datasets.append(cur.take(length, "dataset name").decode(errors="replace"))
    return im


# ---- writing ---------------------------------------------------------------------------------


def write_imatrix(im: Imatrix, path: str | os.PathLike[str], legacy: bool = False,
                  sources: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Write ``im`` as a GGUF imatrix (default) or a legacy ``.dat`` file, atomically.
    ``sources`` are files the output must not overwrite (the model)."""
    if not im.entries:
        raise QuantError("the importance matrix has no entries")
    if legacy:
        _write_dat(im, path, sources)
        return
    w = GGUFWriter(path, pad_end=True)  # as llama.cpp's writer
    w.add_kv(KEY_TYPE, "imatrix")
    w.add_kv(KEY_DATASETS, list(im.datasets), ValueType.ARRAY, ValueType.STRING)
    w.add_kv(KEY_CHUNK_COUNT, int(im.chunk_count), ValueType.UINT32)
    w.add_kv(KEY_CHUNK_SIZE, int(im.chunk_size), ValueType.UINT32)
    for name in sorted(im.entries):
        e = im.entries[name]
        sums = np.ascontiguousarray(e.sums, dtype=np.float32)
        counts = e.counts.astype(np.float32)
        w.add_tensor(name + SUFFIX_SUMS, sums, dims=_ggml_dims(sums.shape[1], sums.shape[0]))
        w.add_tensor(name + SUFFIX_COUNTS, counts, dims=_ggml_dims(1, counts.size))
    check_destination(path, sources, QuantError)
    try:
        w.write()
    except GGUFError as err:
        raise QuantError(str(err)) from None


def _ggml_dims(*dims: int) -> tuple[int, ...]:
    """ggml order dims without trailing ones (llama.cpp's writer stores a (1, n) tensor as 1-D)."""
    out = list(dims)
    while len(out) > 1 and out[-1] == 1:
        out.pop()
    return tuple(out)


def _write_dat(im: Imatrix, path: str | os.PathLike[str],
               sources: Iterable[str | os.PathLike[str]]) -> None:
    chunk = im.chunk_size or DEFAULT_CHUNK_SIZE
    out = bytearray()
    names = [n for n in sorted(im.entries) if (im.entries[n].counts > 0).any()]
    out += struct.pack("<i", len(names))
    for name in names:
        e = im.entries[name]
        raw = name.encode()
        ncall = int(-(-int(e.counts.max()) // chunk))  # chunks, rounded up (never 0)
        counts = np.repeat(e.counts, e.sums.shape[1]).astype(np.float32)
        sums = e.sums.reshape(-1).astype(np.float32)
        values = np.where(counts > 0, sums / np.where(counts > 0, counts, 1), np.float32(1))
        values = (values * np.float32(ncall)).astype("<f4")
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size)
        out += values.tobytes()
    dataset = (im.datasets[-1] if im.datasets else "").encode()
    out += struct.pack("<ii", int(im.chunk_count), len(dataset)) + dataset
    with atomic_output(path, error=QuantError, sources=sources) as f:
        f.write(bytes(out))
