"""Output files written atomically: a temp file next to the destination, renamed over it.

Every file pyllm writes (GGUF from quantize and convert, the KL base of perplexity, the
downloaded default model) goes through :func:`atomic_output`, so a reader never sees half a file
and nothing is left behind however the write ends short of SIGKILL:

- the destination is checked before any work (:func:`check_destination`): a missing folder, a
  folder, an unwritable folder or the input itself is one clear error, not a traceback after
  minutes of quantizing;
- the temp file is ``.OUT.pyllm-tmp-<pid>-<random>`` and holds an exclusive ``flock`` while it is
  written; an exception or Ctrl-C removes it, and so does SIGTERM, which :func:`sigterm_raises`
  turns into :class:`WriteTerminated` (a ``SystemExit`` with code 143, 128 + SIGTERM, the status
  a shell reports for a SIGTERM death) when the program has no SIGTERM handler of its own;
- a SIGKILLed writer leaves its temp file behind: the next write into that folder removes every
  pyllm temp file whose process is gone (its PID is not running and its lock is free), never one
  a live process is writing.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import threading
from collections.abc import Iterable, Iterator
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows: no flock; the PID check alone decides
    fcntl = None  # type: ignore[assignment]

from pyllm.errors import OutputError, PyllmError

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
    return f".{base}{TEMP_MARK}{os.getpid()}-{os.urandom(4).hex()}"  # (what secrets does)


def check_destination(path: str | os.PathLike[str],
                      sources: Iterable[str | os.PathLike[str]] = (),
                      error: type[PyllmError] = OutputError) -> None:
    """Raise ``error`` unless a file can be written at ``path``: its
    folder exists and is writable, ``path`` is not a folder or a device, and it is none of
    ``sources`` (the files being read). Cheap, so callers run it before any real work."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(directory):
        raise error(f"cannot write {path}: the folder {directory} does not exist")
    if not os.path.isdir(directory):
        raise error(f"cannot write {path}: {directory} is not a folder")
    if os.path.isdir(path):
        raise error(f"cannot write {path}: it is a folder (give the output file's name)")
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise error(f"cannot write {path}: it exists and is not a regular file")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise error(f"cannot write {path}: the folder {directory} is not writable")
    for src in sources:
        if _same_file(path, os.fspath(src)):
            raise error(f"cannot write {path}: it is the input file; choose another name")


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
        if pid == os.getpid() or process_running(pid) or _locked(entry.path):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(entry.path)
    return removed


def process_running(pid: int) -> bool:
    """Whether process ``pid`` is alive (a zombie is not; one we may not signal is)."""
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
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`WriteTerminated` in the main thread, so the
    cleanup that runs for Ctrl-C (``except BaseException`` / ``finally`` / ``with``) runs too.
    Only where SIGTERM still has its default action (it would kill the process with the files
    left behind): a program's own handler is left in charge."""
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


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, sources: Iterable[str | os.PathLike[str]] = (),
                  error: type[PyllmError] = OutputError) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content into; on leaving the block it is synced
    and renamed over ``path``, on any exception (and SIGTERM, see :func:`sigterm_raises`) it is
    removed. ``error`` is the PyllmError subclass raised when ``path`` cannot be written."""
    check_destination(path, sources, error)
    directory = os.path.dirname(os.path.abspath(path))
    remove_stale_temp_files(directory)
    with sigterm_raises():
        tmp = os.path.join(directory, temp_name(path))
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(tmp, flags, 0o666)  # the umask applies, as for a plain open()
        except OSError as e:
            raise error(f"cannot write {path}: {e.strerror}") from None
        try:
            if fcntl is not None:
                # held until the fd closes, so a later run can tell this file is in use (a file
                # system without flock leaves the PID check to decide)
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
