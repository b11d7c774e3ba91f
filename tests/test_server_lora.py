"""LoRA adapters in the server: loaded at start (``--lora``), global scales through
GET/POST /lora-adapters, a per-request ``lora`` field, and requests with different adapters
decoded in the same batch, each getting the text it gets alone (SmolLM2 with two random
adapters)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from pyllm.runtime.llm import LLM
from pyllm.server.app import ServerConfig, create_app
from pyllm.server.engine import Engine
from tests.conftest import serve
from tests.test_lora import write_random_adapter

pytestmark = pytest.mark.model

PROMPT = "The capital of France is"
N = 16


@pytest.fixture(scope="module")
def adapters(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("server-lora")
    return [write_random_adapter(root / "a.gguf", smollm2_path, seed=1, dtype=np.float16),
            write_random_adapter(root / "b.gguf", smollm2_path, seed=2, dtype=np.float16)]


@pytest.fixture(scope="module")
def solo(smollm2_path: Path, adapters: list[Path]) -> dict[str, str]:
    """Each configuration's greedy text from the Python API (one sequence, no server)."""
    a, b = adapters
    out = {}
    for name, lora in (("base", None), ("a", [a]), ("b", [b]), ("a+b/2", [a, (b, 0.5)])):
        with LLM(smollm2_path, n_ctx=256, lora=lora) as llm:
            out[name] = llm.generate(PROMPT, max_tokens=N, temperature=0)
    assert len(set(out.values())) == 4  # every adapter changes the text
    return out


@pytest.fixture(scope="module")
def url(smollm2_path: Path, adapters: list[Path]) -> Iterator[str]:
    a, b = adapters
    with LLM(smollm2_path, n_ctx=256) as llm:
        engine = Engine(llm, n_parallel=4, n_ctx=256, lora=[a, (b, 0.5)])
        try:
            with serve(create_app(ServerConfig(model_id="smollm2"), engine=engine)) as u:
                yield u
        finally:
            engine.stop()


def _complete(url: str, **extra: Any) -> str:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": N,
                                                  "temperature": 0, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def test_adapters_loaded_at_start_apply_by_default(url: str, adapters: list[Path],
                                                   solo: dict[str, str]) -> None:
    r = httpx.get(f"{url}/lora-adapters", timeout=30)
    assert r.json() == [{"id": 0, "path": str(adapters[0]), "scale": 1.0},
                        {"id": 1, "path": str(adapters[1]), "scale": 0.5}]
    assert _complete(url) == solo["a+b/2"]


def test_per_request_adapters_share_one_batch(url: str, solo: dict[str, str]) -> None:
    asks = [("base", []), ("a", [{"id": 0, "scale": 1.0}]), ("b", [{"id": 1, "scale": 1.0}]),
            ("a+b/2", [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.5}])] * 2
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda ask: (ask[0], _complete(url, lora=ask[1])), asks))
    for name, text in got:
        assert text == solo[name], name
    # a slot that held another adapter's cache recomputes it: the same prompt again, other way
    assert _complete(url, lora=[{"id": 1, "scale": 1.0}]) == solo["b"]
    assert _complete(url, lora=[]) == solo["base"]


def test_post_sets_the_global_scales(url: str, solo: dict[str, str]) -> None:
    try:
        r = httpx.post(f"{url}/lora-adapters", json=[{"id": 1, "scale": 1.0}], timeout=30)
        assert r.status_code == 200, r.text
        assert [x["scale"] for x in r.json()] == [0.0, 1.0]  # unlisted: 0
        assert _complete(url) == solo["b"]
        chat = httpx.post(f"{url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
            "lora": [{"id": 0, "scale": 1.0}]}, timeout=60)
        assert chat.status_code == 200, chat.text
    finally:
        httpx.post(f"{url}/lora-adapters", json=[{"id": 0, "scale": 1.0},
                                                 {"id": 1, "scale": 0.5}], timeout=30)


@pytest.mark.parametrize(("method", "path", "body", "message"), [
    ("POST", "/v1/completions", {"prompt": "x", "lora": [{"id": 7, "scale": 1.0}]},
     "LoRA adapter id 7 is not one of the 2 loaded at start"),
    ("POST", "/v1/completions", {"prompt": "x", "lora": [{"id": 0}]}, "lora.0.scale"),
    ("POST", "/lora-adapters", [{"id": 2, "scale": 1.0}], "id 2 is not one of the 2"),
    ("POST", "/lora-adapters", {"id": 0}, "adapters"),
])
def test_bad_lora_requests_are_400(url: str, method: str, path: str, body: Any,
                                   message: str) -> None:
    r = httpx.request(method, f"{url}{path}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


def test_embeddings_use_the_global_adapters(url: str, smollm2_path: Path,
                                            adapters: list[Path]) -> None:
    """Whatever adapter a slot's last request used, an embedding is computed with the global
    scales (here a + b/2), the same every time."""
    from pyllm.runtime.llm import LLM

    a, b = adapters
    _complete(url, lora=[{"id": 1, "scale": 1.0}])  # leave slots with another mix
    got = [httpx.post(f"{url}/v1/embeddings", json={"input": "a cat on a mat"}, timeout=60)
           .json()["data"][0]["embedding"] for _ in range(3)]
    with LLM(smollm2_path, n_ctx=256, lora=[a, (b, 0.5)]) as llm:
        want = llm.embed("a cat on a mat")
    for vec in got:
        assert np.abs(np.array(vec) - want).max() < 1e-4
