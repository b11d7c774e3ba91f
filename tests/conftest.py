"""Shared pytest fixtures: the real SmolLM2 model (from the per-user cache) and shared fixtures."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VOCAB_DIR = SHARED / "fixtures" / "vocab"
# Under CI (.ci/run sets CI=true) a missing tool or fixture is a broken setup: fail, not skip.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


# Seconds before a wait on something that should happen is declared a hang. Only a hang guard:
# no test depends on how fast anything happens.
HANG_GUARD = 60.0


def wait_until(condition: Callable[[], object], what: str, poll: float = 0.01) -> None:
    """Poll until ``condition()`` is true; fail as a hang after :data:`HANG_GUARD` seconds."""
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"hung waiting for {what}", pytrace=False)
        time.sleep(poll)


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a thread, on a loopback port bound first (so no other
    process can take it in between); yields its base URL."""
    import uvicorn

    from pyllm.cli.serve import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), "uvicorn to start")
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(HANG_GUARD)
        sock.close()


@contextlib.contextmanager
def batching_engine(model_path: Path, *, n_ctx: int = 2048, n_parallel: int = 4,
                    slot_ctx: int = 1024) -> Iterator[Any]:
    """A server engine on its own LLM (``n_parallel`` slots of ``slot_ctx`` tokens), stopped
    and closed afterwards."""
    from pyllm.runtime.llm import LLM
    from pyllm.server.engine import Engine

    with LLM(model_path, n_ctx=n_ctx) as llm:
        engine = Engine(llm, n_parallel=n_parallel, n_ctx=slot_ctx, max_queue=64)
        try:
            yield engine
        finally:
            engine.stop()


def skip_or_fail(reason: str) -> None:
    """Skip on a developer's machine; fail under CI, which installs everything tests need."""
    if IN_CI:
        pytest.fail(f"{reason} (CI must provide it)", pytrace=False)
    pytest.skip(reason)


def _backends_and_device_kinds() -> tuple[set[str], set[str]]:
    """The backends of the installed build, and those with a device on this machine."""
    try:
        from pyllm import _core
    except ImportError:
        return {"cpu"}, {"cpu"}  # the test run reports the missing extension itself
    return set(_core.backends()), {d["backend"].partition(":")[0] for d in _core.devices()}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that need a backend or device run where there is one, tests of its absence where
    there is none; the others are deselected (not skipped: neither is missing anything).
    .ci/run runs the suite in the default (CPU-only) build, then builds the GPU variant
    (OpenCL + CUDA) and runs the ``gpu`` and ``cuda_no_device`` tests there.

    - ``gpu``: a GPU backend of this build has a device here (tests/test_gpu.py).
    - ``cuda_no_device``: CUDA is built but there is no CUDA device (CI's machines).
    - ``cpu_only_build``: the build has no GPU backend at all.
    """
    built, with_device = _backends_and_device_kinds()
    wanted = {
        "gpu": bool(with_device - {"cpu"}),
        "cuda_no_device": "cuda" in built and "cuda" not in with_device,
        "cpu_only_build": built == {"cpu"},
    }
    keep, drop = [], []
    for item in items:
        ok = all(wanted[m] for m in wanted if item.get_closest_marker(m) is not None)
        (keep if ok else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session", autouse=True)
def repack_cache_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every load in the tests (and the commands they start) uses the repack cache as users
    get it, in a folder of this session's, never the user's: a model's first load saves its
    rows16 copies there, later loads map them."""
    folder = tmp_path_factory.mktemp("repack-cache")
    os.environ["PYLLM_REPACK_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1, downloaded once into the pyllm cache (the same one users get)."""
    from pyllm.runtime.default_model import ensure_model

    return ensure_model(quiet=True)


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    if not VOCAB_DIR.is_dir():
        skip_or_fail(f"llama.cpp vocab fixtures not found at {VOCAB_DIR}")
    return VOCAB_DIR
