"""The repack cache: a model's rows16 copies saved once, mapped by every later process.

Loading a model copies its big matrices into the rows16 layout (csrc/include/pyllm/repack.h)
in fresh memory. That copy is most of a cold process's time to its first token: the kernel
zeroes every fresh page, and on a virtual machine the host may first have to back it (measured:
0.05-2.5 s for a 640 MB arena of 2 MiB pages, run to run). llama.cpp maps the file and pays
nothing of the kind. So the first load of a model file writes its copies to
``<cache>/repack/<key>.rpk``, and later loads map that file instead of repacking: its pages
come from the page cache (no zeroing; mapped in 2 MiB pages where the file system gives large
folios, as ext4 and XFS do on recent kernels), and the GGUF pages of the repacked matrices are
never touched.

- ``<key>`` is a SHA-256 of what decides the bytes: the model files (path, device, inode,
  size, modification time of each shard; no weight is read), the layers this process holds
  (placement, pipeline share), the active ISA and pyllm's version. C++ checks the image's
  *plan* too (a hash of the layout version and every copied tensor's type, shape and offset)
  and repacks as usual when it is not this load's.
- The file is written by a background thread once the model is loaded (generation does not
  wait for it), as an unnamed file (``O_TMPFILE``) that is linked into place only when every
  byte is written: a process killed at any moment, by any signal, leaves nothing behind, and a
  reader never sees half a file. :meth:`ImageWriter.finish` (called by ``LoadedModel.close`` and
  at interpreter exit) waits for that, which is a copy into the page cache, not for the disk
  (syncing a 4 GB file would hold up a short run's exit for many seconds). The header records
  the boot it was written in and whether it has been synced since: an unsynced image is used
  only in the boot that wrote it (its bytes are then the page cache's, whatever reached the
  disk; a crash that could lose them starts a new boot), and is synced by the writer after
  linking or by the next process that maps it.
- ``$PYLLM_REPACK_CACHE``: ``off`` (or ``0``) disables the cache, a path moves it. The folder
  is kept under ``$PYLLM_REPACK_CACHE_GB`` gigabytes (default 20; least recently used files go
  first), and nothing is written when the file system would be left with less than 2 GiB free.
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import struct
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyllm.atomic import remove_stale_temp_files, temp_name
from pyllm.formats.gguf.reader import file_identity

MAGIC = b"PYLLMRPK"
FORMAT_VERSION = 1
SUFFIX = ".rpk"
# The copies start 2 MiB into the file, so that a mapping of the whole file (which the kernel
# places 2 MiB-aligned) can use PMD-sized page-cache folios for them; the gap is a hole.
DATA_OFFSET = 2 << 20
# magic, version, plan, nbytes, data offset, key, boot id, synced (the last byte)
_HEADER = struct.Struct("<8sIQQQ32s16sB")
_SYNCED_AT = _HEADER.size - 1
_CHUNK = 64 << 20  # bytes per write (the thread checks for a stop between chunks)
DEFAULT_BUDGET_GB = 20.0
MIN_FREE_BYTES = 2 << 30


def cache_folder() -> Path | None:
    """Where images live (``$PYLLM_REPACK_CACHE``, else ``repack`` in pyllm's cache folder), or
    None when the cache is turned off."""
    env = os.environ.get("PYLLM_REPACK_CACHE", "")
    if env.strip().lower() in ("0", "off", "false", "no"):
        return None
    if env:
        return Path(env).expanduser()
    from pyllm.runtime.default_model import cache_dir

    return cache_dir() / "repack"


def budget_bytes() -> int:
    """``$PYLLM_REPACK_CACHE_GB`` (default 20) in bytes; a bad value means the default."""
    try:
        gb = float(os.environ.get("PYLLM_REPACK_CACHE_GB", DEFAULT_BUDGET_GB))
    except ValueError:
        gb = DEFAULT_BUDGET_GB
    return max(0, int(gb * (1 << 30)))


def _sha256(data: bytes) -> Any:
    """hashlib.sha256 without loading OpenSSL's libcrypto (~4 ms and 3 MB resident of a cold
    start): CPython's own implementation, the same digest; hashlib's where it is missing."""
    try:
        from _sha2 import sha256  # type: ignore[import-not-found]  # CPython >= 3.12
    except ImportError:
        try:
            from _sha256 import sha256  # type: ignore[import-not-found, no-redef]  # 3.11
        except ImportError:
            from hashlib import sha256  # type: ignore[assignment]
    return sha256(data)


def cache_key(paths: Sequence[str], *, isa: str, version: str, placement: Sequence[object],
              layer_range: object) -> str:
    """The image name for these model files and this load (see the module doc)."""
    h = _sha256(f"pyllm-repack {FORMAT_VERSION} {version} {isa}".encode())
    for p in paths:
        identity = "|".join(map(str, file_identity(os.stat(p))))
        h.update(f"|{os.path.realpath(p)}|{identity}".encode())
    h.update(repr((list(placement), layer_range)).encode())
    return h.hexdigest()


def boot_id() -> bytes:
    """This boot's id (16 bytes; zeros where the system does not say)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return bytes.fromhex(f.read().strip().replace("-", ""))[:16].ljust(16, b"\0")
    except (OSError, ValueError):
        return bytes(16)


def _sync(path: Path) -> None:
    """Flushes an image to disk, then marks it synced (its last header byte)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
            os.pwrite(fd, b"\1", _SYNCED_AT)
            os.fdatasync(fd)
        finally:
            os.close(fd)


@dataclass
class Image:
    """A mapped image: ``view`` is its copies (a read-only buffer), ``plan`` their layout."""

    path: Path
    view: memoryview
    plan: int
    _map: mmap.mmap

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(BufferError):
            self._map.close()


def open_image(folder: Path, key: str) -> Image | None:
    """The image saved under ``key``, mapped, or None (none, unreadable or not an image)."""
    path = folder / (key + SUFFIX)
    try:
        with open(path, "rb") as f:
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                return None
            magic, version, plan, nbytes, offset, raw_key, boot, synced = _HEADER.unpack(header)
            size = os.fstat(f.fileno()).st_size
            if (magic != MAGIC or version != FORMAT_VERSION or raw_key != bytes.fromhex(key)
                    or offset != DATA_OFFSET or nbytes <= 0 or size != offset + nbytes):
                return None
            this_boot = boot == boot_id() and boot != bytes(16)
            if not synced and not this_boot:
                return None  # written before a crash or reboot and maybe never on disk
            m = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
    except (OSError, ValueError):
        return None
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # advisory: reads from disk come in 2 MiB folios
            m.madvise(mmap.MADV_HUGEPAGE)
    with contextlib.suppress(OSError):
        os.utime(path)  # least recently used goes first when the folder is over budget
    if not synced:  # its writer exited before syncing: do it now, off the load's path
        threading.Thread(target=_sync, args=(path,), name="pyllm-repack-sync",
                         daemon=True).start()
    return Image(path, memoryview(m)[offset:offset + nbytes], plan, m)


def _evict(folder: Path, keep: int) -> None:
    """Removes the least recently used images until at most ``keep`` bytes of them remain."""
    entries = []
    for p in folder.glob("*" + SUFFIX):
        with contextlib.suppress(OSError):
            st = p.stat()
            entries.append((st.st_mtime_ns, st.st_size, p))
    entries.sort()
    total = sum(size for _, size, _ in entries)
    for _, size, p in entries:
        if total <= keep:
            break
        with contextlib.suppress(OSError):
            p.unlink()
            total -= size


class ImageWriter(threading.Thread):
    """Writes a just-made image in the background (see the module doc). ``owner`` (the
    ``pyllm._core.Model`` whose bytes ``view`` shows) is kept referenced until they have been
    written, so a model dropped without ``close()`` cannot free them under the write."""

    def __init__(self, folder: Path, key: str, view: memoryview, plan: int,
                 owner: object) -> None:
        super().__init__(name="pyllm-repack-cache", daemon=True)
        self.folder, self.key, self.view, self.plan = folder, key, view, plan
        self._owner: object = owner
        self.path = folder / (key + SUFFIX)
        self.done = False  # the image is in place
        self.error: str | None = None  # why it is not (for --verbose and tests)
        self._stop_event = threading.Event()
        self._released = threading.Event()  # the model's bytes are no longer read

    def run(self) -> None:
        try:
            self.done = self._write()
        except OSError as e:
            self.error = f"{self.path}: {e.strerror or e}"
        finally:
            self.view = memoryview(b"")
            self._owner = None
            self._released.set()
        if self.done and not self._stop_event.is_set():
            _sync(self.path)

    def _write(self) -> bool:
        n = self.view.nbytes
        self.folder.mkdir(parents=True, exist_ok=True)
        budget = budget_bytes()
        if n + DATA_OFFSET > budget:
            self.error = f"the image ({n} bytes) is over the cache budget ({budget} bytes)"
            return False
        _evict(self.folder, budget - n - DATA_OFFSET)
        free = os.statvfs(self.folder)
        if free.f_bavail * free.f_frsize < n + MIN_FREE_BYTES:
            self.error = "less than 2 GiB would be left free on the cache's file system"
            return False
        remove_stale_temp_files(self.folder)  # a link made by a process killed before its rename
        fd = os.open(self.folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644)
        try:
            header = _HEADER.pack(MAGIC, FORMAT_VERSION, self.plan, n, DATA_OFFSET,
                                  bytes.fromhex(self.key), boot_id(), 0)
            os.pwrite(fd, header, 0)
            done = 0
            while done < n:
                if self._stop_event.is_set():
                    return False
                done += os.pwrite(fd, self.view[done:min(n, done + _CHUNK)], DATA_OFFSET + done)
            tmp = self.folder / temp_name(self.path)
            # linkat(2) with AT_SYMLINK_FOLLOW through /proc/self/fd names the unnamed file
            # (a dir fd is given because os.link calls plain link(2), which would try to link
            # the /proc symlink itself, without one)
            proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.link(str(fd), tmp, src_dir_fd=proc, follow_symlinks=True)
            finally:
                os.close(proc)
            os.replace(tmp, self.path)
            return True
        finally:
            os.close(fd)

    def finish(self, abandon: bool = False) -> None:
        """Waits until the image is in place, or given up, and the model's bytes are no longer
        read (``abandon``: stops the write first; nothing is left behind). The sync that
        follows goes on in the background."""
        if abandon:
            self._stop_event.set()
        try:
            self._released.wait()
        except KeyboardInterrupt:
            self._stop_event.set()
            self._released.wait()
            raise


_writers: weakref.WeakSet[ImageWriter] = weakref.WeakSet()


def start_writer(folder: Path, key: str, view: memoryview, plan: int,
                 owner: object) -> ImageWriter | None:
    """Starts writing an image (None where this platform has no unnamed temp files)."""
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    writer = ImageWriter(folder, key, view, plan, owner)
    _writers.add(writer)
    writer.start()
    return writer


@atexit.register
def _finish_all() -> None:
    """At exit, before the interpreter tears down the models whose bytes the writers read:
    waits for the writes; Ctrl-C while waiting gives them up, quietly (nothing is left)."""
    writers = list(_writers)
    try:
        for writer in writers:
            writer.finish()
    except KeyboardInterrupt:
        for writer in writers:
            writer.finish(abandon=True)
