"""The repack cache (pyllm/runtime/repack_cache.py): a model's rows16 copies saved by its first
load and mapped by later ones, giving the same logits bit for bit; stale, foreign, damaged or
unsynced images from another boot are never used; nothing half-written is ever left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pyllm.formats.gguf import GGMLType
from pyllm.runtime import repack_cache as rc
from pyllm.runtime.llm import LLM
from tests.test_kernels import core
from tests.tiny_models import TinySpec, write_tiny

pytestmark = pytest.mark.skipif(core.active_isa() != "avx512",
                                reason="the model repacks only for ISAs with rows16 kernels")

TOKENS = [5, 17, 33, 2, 90, 41, 7, 12, 64, 3, 150, 22]


def _model(tmp_path: Path, seed: int = 3, name: str = "m.gguf") -> Path:
    # Q4_K and Q6_K matrices: a grown layout (unpacked scales) and a reordered one
    spec = TinySpec(n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=272,
                    wtype=GGMLType.Q4_K, seed=seed)
    return write_tiny(tmp_path / name, spec)


def _run(path: Path, **kw: object) -> tuple[np.ndarray, np.ndarray, bool]:
    """Prompt logits, three decode steps' logits, and whether the copies were mapped."""
    with LLM(path, n_ctx=64, n_threads=2, **kw) as llm:  # type: ignore[arg-type]
        cached = llm.model.repack_cached
        prompt = llm.logits(TOKENS)
        steps = np.stack([llm.eval([t]) for t in (9, 19, 29)])
    if llm.model.repack_writer is not None:
        llm.model.repack_writer.join()  # its sync too: the test may edit the file next
    return prompt, steps, cached


def _images(folder: Path) -> list[Path]:
    return sorted(folder.iterdir())


def test_a_later_load_maps_the_saved_copies_and_gives_the_same_logits(tmp_path: Path) -> None:
    path, folder = _model(tmp_path), tmp_path / "cache"
    first = _run(path, repack_cache=folder)
    assert not first[2]
    (image,) = _images(folder)
    assert image.suffix == ".rpk" and image.stat().st_size > rc.DATA_OFFSET
    second = _run(path, repack_cache=folder)
    assert second[2]
    np.testing.assert_array_equal(second[0], first[0])
    np.testing.assert_array_equal(second[1], first[1])
    # the same copies as a load that never saw a cache
    fresh = _run(path, repack_cache=False)
    assert not fresh[2]
    np.testing.assert_array_equal(fresh[1], first[1])
    assert _images(folder) == [image]


def test_the_environment_switch_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _model(tmp_path)
    monkeypatch.setenv("PYLLM_REPACK_CACHE", "off")
    assert rc.cache_folder() is None
    assert not _run(path)[2] and not _run(path)[2]
    monkeypatch.setenv("PYLLM_REPACK_CACHE", str(tmp_path / "env"))
    assert not _run(path)[2] and _run(path)[2]
    assert len(_images(tmp_path / "env")) == 1


def test_another_file_at_the_same_path_does_not_use_the_old_copies(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    path = _model(tmp_path, seed=3)
    old = _run(path, repack_cache=folder)
    path.unlink()
    _model(tmp_path, seed=4)  # same name, same shapes, other weights
    new = _run(path, repack_cache=folder)
    assert not new[2]  # another file (its inode, size or time differ): repacked
    assert not np.array_equal(new[1], old[1])
    np.testing.assert_array_equal(new[1], _run(path, repack_cache=False)[1])


def test_an_image_of_another_plan_is_ignored_and_replaced(tmp_path: Path) -> None:
    path, folder = _model(tmp_path), tmp_path / "cache"
    want = _run(path, repack_cache=folder)
    (image,) = _images(folder)
    raw = bytearray(image.read_bytes())
    raw[12] ^= 1  # the plan's low byte (after the magic and the version)
    image.write_bytes(raw)
    again = _run(path, repack_cache=folder)
    assert not again[2]  # C++ saw another plan: repacked, and saved anew
    np.testing.assert_array_equal(again[1], want[1])
    assert _run(path, repack_cache=folder)[2]


@pytest.mark.parametrize("damage", ["truncated", "magic", "key", "empty"])
def test_a_damaged_image_is_not_used(tmp_path: Path, damage: str) -> None:
    path, folder = _model(tmp_path), tmp_path / "cache"
    want = _run(path, repack_cache=folder)
    (image,) = _images(folder)
    raw = bytearray(image.read_bytes())
    if damage == "truncated":
        raw = raw[:-4096]
    elif damage == "magic":
        raw[0] ^= 0xFF
    elif damage == "key":
        raw[40] ^= 0xFF  # inside the key
    else:
        raw = bytearray()
    image.write_bytes(raw)
    got = _run(path, repack_cache=folder)
    assert not got[2]
    np.testing.assert_array_equal(got[1], want[1])


def test_an_unsynced_image_is_used_only_in_the_boot_that_wrote_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, folder = _model(tmp_path), tmp_path / "cache"
    _run(path, repack_cache=folder)
    (image,) = _images(folder)
    raw = bytearray(image.read_bytes())
    raw[rc._SYNCED_AT] = 0
    image.write_bytes(raw)
    monkeypatch.setattr(rc, "_sync", lambda path: None)  # leave it unsynced
    assert _run(path, repack_cache=folder)[2]  # this boot: the page cache holds its bytes
    monkeypatch.setattr(rc, "boot_id", lambda: b"\x01" * 16)
    assert not _run(path, repack_cache=folder)[2]  # another boot: maybe never on disk
    # a synced one is used whatever the boot (control: the same image with its flag set)
    raw[rc._SYNCED_AT] = 1
    image.write_bytes(raw)
    assert _run(path, repack_cache=folder)[2]


def test_the_writer_syncs_and_marks_the_image(tmp_path: Path) -> None:
    path, folder = _model(tmp_path), tmp_path / "cache"
    with LLM(path, n_ctx=64, repack_cache=folder) as llm:
        writer = llm.model.repack_writer
        assert writer is not None
    writer.join()  # the sync after the link
    assert writer.done and writer.error is None
    (image,) = _images(folder)
    header = image.read_bytes()[:rc._HEADER.size]
    assert header[:8] == rc.MAGIC and header[rc._SYNCED_AT] == 1


def test_an_abandoned_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, folder = _model(tmp_path), tmp_path / "cache"
    monkeypatch.setattr(rc, "_CHUNK", 4096)  # many chunks: the stop is seen between two
    llm = LLM(path, n_ctx=64, repack_cache=folder)
    writer = llm.model.repack_writer
    assert writer is not None
    writer.finish(abandon=True)
    llm.close()
    assert not writer.done or _images(folder)  # either stopped, or it had already finished
    for p in folder.iterdir():  # never a temp file or a partial image
        assert p.suffix == ".rpk" and p.stat().st_size > rc.DATA_OFFSET


def test_a_killed_process_leaves_no_partial_file(tmp_path: Path) -> None:
    path, folder = _model(tmp_path), tmp_path / "cache"
    code = textwrap.dedent(f"""
        import os, signal
        from pyllm.runtime import repack_cache as rc
        rc._CHUNK = 4096
        from pyllm.runtime.llm import LLM
        llm = LLM({str(path)!r}, n_ctx=64, repack_cache={str(folder)!r})
        os.kill(os.getpid(), signal.SIGKILL)  # mid-write: the writer has just started
    """)
    # from tmp_path: the checkout's own pyllm/ (sources without the built extension) must not
    # shadow the installed package
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL
    left = _images(folder) if folder.exists() else []
    if left:  # the write had finished: then it is the whole image
        _run(path, repack_cache=tmp_path / "reference")
        (reference,) = _images(tmp_path / "reference")
        assert [p.suffix for p in left] == [".rpk"]
        assert left[0].stat().st_size == reference.stat().st_size


def test_the_budget_evicts_the_least_recently_used(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "cache"
    a, b = _model(tmp_path, 3, "a.gguf"), _model(tmp_path, 4, "b.gguf")
    _run(a, repack_cache=folder)
    (image_a,) = _images(folder)
    size = image_a.stat().st_size
    monkeypatch.setenv("PYLLM_REPACK_CACHE_GB", str(1.5 * size / (1 << 30)))  # room for one
    _run(b, repack_cache=folder)
    (image_b,) = _images(folder)
    assert image_b != image_a  # a's went to make room for b's
    monkeypatch.setenv("PYLLM_REPACK_CACHE_GB", str(0.5 * size / (1 << 30)))  # room for none
    with LLM(a, n_ctx=64, repack_cache=folder) as llm:
        writer = llm.model.repack_writer
        assert writer is not None
    writer.join()
    assert not writer.done and "budget" in (writer.error or "")
    assert _images(folder) == [image_b]


def test_the_cli_maps_the_copies_on_its_second_run(tmp_path: Path, smollm2_path: Path) -> None:
    folder = tmp_path / "cache"
    env = {**os.environ, "PYLLM_REPACK_CACHE": str(folder)}
    cmd = [sys.executable, "-m", "pyllm", "run", "-m", str(smollm2_path), "-p", "The sky is",
           "-n", "8", "--temp", "0", "-c", "256", "--verbose"]
    runs = [subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120,
                           cwd=tmp_path) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert runs[1].stdout == runs[0].stdout
    assert "repack cache: saving" in runs[0].stderr
    assert "repack cache: mapped" in runs[1].stderr
    assert len(_images(folder)) == 1


def test_a_model_dropped_mid_write_keeps_its_bytes_until_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    path, folder = _model(tmp_path), tmp_path / "cache"
    want = _run(path, repack_cache=False)
    monkeypatch.setattr(rc, "_CHUNK", 4096)  # a slow write: the model goes while it runs
    llm = LLM(path, n_ctx=64, n_threads=2, repack_cache=folder)
    writer = llm.model.repack_writer
    assert writer is not None
    del llm  # no close(): the writer holds the C++ model until its bytes are written
    gc.collect()
    writer.join()
    assert writer.done, writer.error
    got = _run(path, repack_cache=folder)
    assert got[2]
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_ctrl_c_while_exit_waits_gives_the_writes_up(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path, folder = _model(tmp_path), tmp_path / "cache"
    monkeypatch.setattr(rc, "_CHUNK", 4096)
    llm = LLM(path, n_ctx=64, repack_cache=folder)
    writer = llm.model.repack_writer
    assert writer is not None
    waits = []

    def interrupted(abandon: bool = False) -> None:  # Ctrl-C arrives during the first wait
        waits.append(abandon)
        if not abandon:
            raise KeyboardInterrupt
        rc.ImageWriter.finish(writer, abandon=True)

    writer.finish = interrupted  # type: ignore[method-assign]
    rc._finish_all()  # returns: no KeyboardInterrupt escapes into the interpreter's exit
    assert waits == [False, True]
    assert not writer.is_alive() or writer._released.is_set()
    del writer.finish  # the instance attribute: close() waits the usual way
    llm.close()
    for p in folder.iterdir() if folder.exists() else []:
        assert p.suffix == ".rpk" and p.stat().st_size > rc.DATA_OFFSET
