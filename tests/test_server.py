"""pyllm serve: the batching engine and the OpenAI-compatible HTTP API on SmolLM2.

Servers run in-process (uvicorn on a thread, free loopback port) around one shared engine; the
CLI test starts ``pyllm serve`` as a subprocess and stops it with SIGTERM. Clients are the
official ``openai`` package, unchanged, and httpx for what it cannot send (malformed bodies,
disconnects). Greedy outputs are checked against the single-sequence path (``LLM.generate``), so
batching must not change results.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import uvicorn  # noqa: E402

from pyllm.model import LLM  # noqa: E402
from pyllm.sampling import SamplingParams  # noqa: E402
from pyllm.server.app import ServerConfig, create_app  # noqa: E402
from pyllm.server.engine import DoneEvent, Engine, Request, TokenEvent  # noqa: E402

pytestmark = pytest.mark.model  # every test serves SmolLM2

ROOT = Path(__file__).resolve().parents[1]
N_CTX = 256  # per slot

PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "def fib(n):",
           "The quick brown fox", "My favourite colour is"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a thread; yields its base URL."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def llm(smollm2_path: Path) -> Iterator[LLM]:
    with LLM(smollm2_path, n_ctx=N_CTX) as model:
        model.tokenizer  # noqa: B018 - built once here
        yield model


@pytest.fixture(scope="module")
def engine(llm: LLM) -> Iterator[Engine]:
    eng = Engine(llm, n_parallel=4, n_ctx=N_CTX, max_queue=64)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def base_url(engine: Engine) -> Iterator[str]:
    with serve(create_app(ServerConfig(model_id="smollm2", max_body_bytes=64 * 1024),
                          engine=engine)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Any:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                         timeout=60)


def _greedy(llm: LLM, prompt: str, n: int) -> str:
    return llm.generate(prompt, max_tokens=n, temperature=0)


def _wait_idle(engine: Engine, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while engine.active or engine.queue_depth:
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"engine still busy after {timeout} s: {engine.active} active, "
                                 f"{engine.queue_depth} queued")
        time.sleep(0.01)
    return time.monotonic() - t0


# ---- engine -----------------------------------------------------------------------------------


def _run_together(engine: Engine, llm: LLM, prompts: list[str], max_tokens: int
                  ) -> tuple[list[str], list[DoneEvent]]:
    """Submit all prompts at once (greedy); their texts and end events."""
    done = threading.Event()
    texts: list[list[str]] = [[] for _ in prompts]
    ends: dict[int, DoneEvent] = {}

    def sink(i: int) -> Any:
        def on_event(ev: Any) -> None:
            if isinstance(ev, TokenEvent):
                texts[i].append(ev.text)
            else:
                ends[i] = ev
                if len(ends) == len(prompts):
                    done.set()
        return on_event

    for i, p in enumerate(prompts):
        engine.submit(Request(llm.tokenize(p), SamplingParams(temperature=0), sink(i),
                              max_tokens=max_tokens))
    assert done.wait(60)
    return ["".join(t) for t in texts], [ends[i] for i in range(len(prompts))]


def test_engine_batched_greedy_matches_single_sequence(llm: LLM, engine: Engine) -> None:
    """Prompts of different lengths decoded together give the single-sequence greedy text;
    the second round reuses the slots' cached prefixes and must still agree."""
    expected = [_greedy(llm, p, 8) for p in PROMPTS[:4]]
    texts, ends = _run_together(engine, llm, PROMPTS[:4], 8)
    assert texts == expected
    assert all(e.finish_reason == "length" and e.completion_tokens == 8 for e in ends)
    before = engine.stats.prompt_tokens_evaluated
    texts, _ = _run_together(engine, llm, PROMPTS[:4], 8)
    assert texts == expected
    # round two found every prompt but its last token in a slot's cache
    assert engine.stats.prompt_tokens_evaluated - before == 4


def test_engine_stop_string_and_zero_tokens(llm: LLM, engine: Engine) -> None:
    full = _greedy(llm, "1, 2, 3, 4,", 8)
    assert " 6" in full
    events: list[Any] = []
    done = threading.Event()

    def on_event(ev: Any) -> None:
        events.append(ev)
        if isinstance(ev, DoneEvent):
            done.set()

    engine.submit(Request(llm.tokenize("1, 2, 3, 4,"), SamplingParams(temperature=0), on_event,
                          max_tokens=8, stop=[" 6"]))
    assert done.wait(30)
    text = "".join(e.text for e in events if isinstance(e, TokenEvent))
    assert text == full[:full.index(" 6")]
    assert events[-1].finish_reason == "stop"
    done.clear()
    events.clear()
    engine.submit(Request(llm.tokenize("Hi"), SamplingParams(), on_event, max_tokens=0))
    assert done.wait(10)
    assert events == [DoneEvent("length", len(llm.tokenize("Hi")), 0)]


def test_engine_cancel_mid_prompt(llm: LLM) -> None:
    """A long prompt is fed in chunks of n_batch; cancelling during it frees the slot at the
    next step, before the rest of the prompt is evaluated."""
    eng = Engine(llm, n_parallel=1, n_ctx=512, n_batch=16)
    try:
        events: list[Any] = []
        done = threading.Event()

        def on_event(ev: Any) -> None:
            events.append(ev)
            if isinstance(ev, DoneEvent):
                done.set()

        prompt = llm.tokenize("one two three four five six seven " * 40)[:400]
        handle = eng.submit(Request(prompt, SamplingParams(temperature=0), on_event,
                                    max_tokens=4))
        while eng.stats.steps_total == 0:
            time.sleep(0.002)
        handle.cancel()
        assert done.wait(10)
        assert events == [DoneEvent("cancelled", len(prompt), 0)]
        assert eng.active == 0 and eng.stats.steps_total < len(prompt) // 16
        # the slot is usable again and the next request sees only what it was fed
        done.clear()
        events.clear()
        eng.submit(Request(llm.tokenize("Hello"), SamplingParams(temperature=0), on_event,
                           max_tokens=3))
        assert done.wait(30)
        assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == \
            _greedy(llm, "Hello", 3)
    finally:
        eng.stop()


# ---- OpenAI client ------------------------------------------------------------------------------


def test_openai_completion(client: Any, llm: LLM) -> None:
    r = client.completions.create(model="smollm2", prompt=PROMPTS[0], max_tokens=6,
                                  temperature=0)
    assert r.object == "text_completion" and r.model == "smollm2"
    assert r.choices[0].text == _greedy(llm, PROMPTS[0], 6)
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(llm.tokenize(PROMPTS[0]))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 6)
    # echo, token-id prompts and logprobs
    ids = llm.tokenize(PROMPTS[0])
    r2 = client.completions.create(model="smollm2", prompt=ids, max_tokens=6, temperature=0,
                                   echo=True, logprobs=2)
    assert r2.choices[0].text == llm.detokenize(ids) + r.choices[0].text
    lp = r2.choices[0].logprobs
    assert len(lp.tokens) == 6 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) == 2 for t in lp.top_logprobs)


def test_openai_completion_stream(client: Any, llm: LLM) -> None:
    stream = client.completions.create(model="smollm2", prompt=PROMPTS[2], max_tokens=8,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == _greedy(llm, PROMPTS[2], 8)
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # really streamed
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == 8


def test_openai_chat_and_chat_stream(client: Any, llm: LLM) -> None:
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."}]
    expected = llm.chat(messages, max_tokens=10, temperature=0)
    r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=10,
                                       temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=10,
                                            temperature=0, stream=True, logprobs=True,
                                            top_logprobs=1)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert any(c.choices[0].logprobs and c.choices[0].logprobs.content for c in chunks)


def test_n_choices(client: Any, llm: LLM) -> None:
    """n > 1: that many choices decoded together; greedy ones agree, seeded ones repeat."""
    r = client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                  n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert {c.text for c in r.choices} == {_greedy(llm, PROMPTS[0], 4)}
    assert r.usage.prompt_tokens == len(llm.tokenize(PROMPTS[0]))
    assert r.usage.completion_tokens == 8
    seeded = [[c.text for c in client.completions.create(
        model="m", prompt="Once upon a time", max_tokens=5, temperature=1.0, seed=5,
        n=3).choices] for _ in range(2)]
    assert seeded[0] == seeded[1] and len(set(seeded[0])) > 1
    stream = client.chat.completions.create(model="m", n=2, max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "Hi"}])
    texts = ["", ""]
    finals: list[int] = []
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finals.append(ch.index)
    assert sorted(finals) == [0, 1] and texts[0] == texts[1] and texts[0]
    assert c.usage.completion_tokens <= 8


def test_models_tokenize_detokenize_health_metrics(client: Any, base_url: str,
                                                   llm: LLM) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]
    assert client.completions.create(model="m", prompt="Hi", max_tokens=1).usage
    ids = httpx.post(f"{base_url}/tokenize", json={"content": "Hello world"}).json()["tokens"]
    assert ids == llm.tokenize("Hello world", add_special=False)
    pieces = httpx.post(f"{base_url}/tokenize",
                        json={"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hello world"
    text = httpx.post(f"{base_url}/detokenize", json={"tokens": ids}).json()["content"]
    assert text == "Hello world"
    health = httpx.get(f"{base_url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = httpx.get(f"{base_url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    values = {}
    for line in metrics.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["pyllm_requests_total"] >= 1
    assert values["pyllm_completion_tokens_total"] >= 1
    assert values["pyllm_queue_depth"] == 0 and values["pyllm_slots_total"] == 4
    assert "pyllm_tokens_per_second" in values
    assert values['pyllm_http_requests_total{route="/tokenize",status="200"}'] == 2


def test_chat_page_is_self_contained(base_url: str) -> None:
    """GET / serves the chat page with every knob, and it loads nothing from elsewhere."""
    import re

    r = httpx.get(f"{base_url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for knob in ("system", "temperature", "top_k", "top_p", "min_p", "typical_p", "tfs_z",
                 "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty",
                 "mirostat", "mirostat_tau", "mirostat_eta", "seed", "max_tokens",
                 "stop_strings", "stop", "send"):
        assert f'id="{knob}"' in page, knob
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page


def test_sixteen_concurrent_clients(client: Any, llm: LLM, engine: Engine) -> None:
    """16 clients at once (4 slots, 12 waiting): every one succeeds with its greedy text."""
    expected = {p: _greedy(llm, p, 4) for p in PROMPTS}

    def one(i: int) -> tuple[str, str]:
        p = PROMPTS[i % len(PROMPTS)]
        if i % 2:
            stream = client.completions.create(model="m", prompt=p, max_tokens=4,
                                               temperature=0, stream=True)
            return p, "".join(c.choices[0].text for c in stream)
        r = client.completions.create(model="m", prompt=p, max_tokens=4, temperature=0)
        return p, r.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert all(text == expected[p] for p, text in results)
    _wait_idle(engine)


def test_sampling_fields_and_seed(client: Any) -> None:
    """llama.cpp's extra fields are accepted; a fixed seed repeats the same text."""
    extra = {"top_k": 20, "min_p": 0.1, "typical_p": 0.9, "tfs_z": 0.95, "repeat_penalty": 1.1,
             "repeat_last_n": 32, "mirostat_mode": 0, "mirostat_tau": 4.0, "mirostat_eta": 0.2}
    texts = [client.completions.create(model="m", prompt="Once upon a time", max_tokens=6,
                                       temperature=1.0, seed=1234, extra_body=extra,
                                       presence_penalty=0.5,
                                       frequency_penalty=0.5).choices[0].text
             for _ in range(2)]
    assert texts[0] == texts[1] and texts[0]
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, seed=7,
                                       extra_body={"mirostat": 2, "mirostat_tau": 3.0})
    assert r.usage.completion_tokens <= 4


def test_openai_embeddings(client: Any, base_url: str, llm: LLM, engine: Engine) -> None:
    """Mean-pooled, L2-normalized embeddings; the openai package asks for base64 by default,
    httpx for floats; both equal ``LLM.embed`` (one text at a time), and embeddings
    computed while a generation runs leave that generation's greedy text unchanged."""
    import numpy as np

    if not engine.supports_embeddings:
        pytest.skip("this build of the extension has no Context.embed")
    texts = ["The cat sat on the mat.", "A cat was sitting on a rug.",
             "Stock markets fell sharply today."]
    expected_text = _greedy(llm, PROMPTS[3], 10)
    with ThreadPoolExecutor(1) as pool:
        gen = pool.submit(lambda: client.completions.create(
            model="m", prompt=PROMPTS[3], max_tokens=10, temperature=0).choices[0].text)
        r = client.embeddings.create(model="m", input=texts)
        assert gen.result() == expected_text
    v = np.array([d.embedding for d in r.data])
    assert v.shape == (3, engine.n_embd) and [d.index for d in r.data] == [0, 1, 2]
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[1, 2]  # the two cat sentences are closest
    assert r.usage.prompt_tokens == sum(len(llm.tokenize(t)) for t in texts)
    np.testing.assert_allclose(v, [llm.embed(t) for t in texts], atol=1e-6)  # the library's
    floats = httpx.post(f"{base_url}/v1/embeddings",
                        json={"input": llm.tokenize(texts[0]), "encoding_format": "float"})
    np.testing.assert_allclose(floats.json()["data"][0]["embedding"], v[0], atol=1e-6)
    for bad in ({"input": []}, {"input": "x", "dimensions": 3}, {"input": [[1, 10**9]]},
                {"input": "word " * 300}, {"input": "x", "encoding_format": "int8"}):
        r2 = httpx.post(f"{base_url}/v1/embeddings", json=bad)
        assert r2.status_code == 400, (bad, r2.text)
        assert r2.json()["error"]["type"] == "invalid_request_error"


# ---- reliability --------------------------------------------------------------------------------


def test_disconnect_mid_stream_frees_the_slot(base_url: str, engine: Engine) -> None:
    cancelled = engine.stats.finished["cancelled"]
    no_eos = {str(t): -100 for t in engine.stop_ids}  # it must still be running at hang-up
    with httpx.stream("POST", f"{base_url}/v1/completions", timeout=30,
                      json={"prompt": "Once upon a time", "max_tokens": 200, "stream": True,
                            "temperature": 0, "logit_bias": no_eos}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one token arrived: hang up
    generated = engine.stats.completion_tokens_total
    assert _wait_idle(engine, 5) < 5
    assert engine.stats.finished["cancelled"] == cancelled + 1
    assert engine.stats.completion_tokens_total - generated < 20


def test_disconnect_non_streaming_request(base_url: str, engine: Engine) -> None:
    cancelled = engine.stats.finished["cancelled"]
    # 200 tokens (about what fits a 256-position slot after the chat prompt) take ~0.4-1 s on
    # the 2-core box with the rows16 decode kernels; the client gives up well before that
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/chat/completions", timeout=0.25,
                   json={"messages": [{"role": "user", "content": "Tell me a long story"}],
                         "max_tokens": 200, "temperature": 0,
                         "logit_bias": {str(t): -100 for t in engine.stop_ids}})
    deadline = time.monotonic() + 10  # under load the request may only now be submitted
    while engine.stats.finished["cancelled"] == cancelled:
        assert time.monotonic() < deadline, "the abandoned request was not cancelled"
        time.sleep(0.01)
    _wait_idle(engine, 5)
    assert engine.stats.finished["cancelled"] == cancelled + 1


@pytest.mark.parametrize(("body", "status", "param"), [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b"\xff\xfe", 400, None),
    (b"[" * 20000, 400, None),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": "x", "bogus": 1}, 400, "bogus"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 2.0}, 400, None),
    ({"prompt": "x", "mirostat": 3}, 400, None),
    ({"prompt": "x", "n": 9}, 400, "n"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, 400, None),
    ({"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ({"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": N_CTX}, 400, "max_tokens"),
    ({"prompt": "x", "stop": ["a"] * 17}, 400, "stop"),
])
def test_malformed_completion_requests(base_url: str, body: Any, status: int,
                                       param: str | None) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{base_url}/v1/completions", timeout=30,
                   headers={"content-type": "application/json"}, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param)


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": [{"role": "wizard", "content": "hi"}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": "hello"},
    {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
    {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json"}},
    {"messages": [{"role": "user", "content": "x " * 400}]},
])
def test_malformed_chat_requests(base_url: str, body: Any) -> None:
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_body_limit_unknown_route_and_survival(base_url: str) -> None:
    big = {"prompt": "x" * (70 * 1024)}
    r = httpx.post(f"{base_url}/v1/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}'

    r = httpx.post(f"{base_url}/v1/completions", content=chunked())
    assert r.status_code == 413
    r = httpx.post(f"{base_url}/v2/nothing", json={})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(f"{base_url}/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.post(f"{base_url}/detokenize", json={"tokens": [-1]})
    assert r.status_code == 400
    assert httpx.get(f"{base_url}/health").status_code == 200  # still alive


def test_api_key(engine: Engine) -> None:
    app = create_app(ServerConfig(api_key="s3cret"), engine=engine)
    with serve(app) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/").status_code == 401  # the page too, unless the key is given
        assert httpx.get(f"{url}/?api_key=wrong").status_code == 401
        assert httpx.get(f"{url}/?api_key=s3cret").status_code == 200
        assert httpx.get(f"{url}/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/v1/models?api_key=s3cret").status_code == 401  # page only
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(f"{url}{path}")
            assert r.status_code == 401, path
            assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x"},
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="m", prompt="x", max_tokens=1)
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="m", prompt="Hi", max_tokens=2).usage
        assert good.models.list().data


def test_cors_off_by_default_and_opt_in(engine: Engine, base_url: str) -> None:
    pre = {"Origin": "http://example.com", "Access-Control-Request-Method": "POST"}
    r = httpx.options(f"{base_url}/v1/completions", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    with serve(create_app(ServerConfig(cors_origins=["http://example.com"]),
                          engine=engine)) as url:
        r = httpx.options(f"{url}/v1/completions", headers=pre)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://example.com"


def test_chat_format_option(engine: Engine, llm: LLM) -> None:
    """--chat-format renders with the named built-in format instead of the model's template."""
    messages = [{"role": "user", "content": "Hello!"}]
    expected = llm.chat(messages, max_tokens=5, temperature=0, chat_format="llama-2")
    with serve(create_app(ServerConfig(chat_format="llama-2"), engine=engine)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                       json={"messages": messages, "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == expected


def test_queue_full_is_503(llm: LLM) -> None:
    """1 slot + a queue of 1: a third request is refused with 503 while both are held open;
    closing them frees everything."""
    eng = Engine(llm, n_parallel=1, n_ctx=256, max_queue=1)
    body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True}
    try:
        with serve(create_app(ServerConfig(), engine=eng)) as url, httpx.Client(timeout=30) as c:
            with c.stream("POST", f"{url}/v1/completions", json=body) as first, \
                    c.stream("POST", f"{url}/v1/completions", json=body) as second:
                assert first.status_code == second.status_code == 200
                deadline = time.monotonic() + 10
                while not (eng.active == 1 and eng.queue_depth == 1):  # admission is async
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
                r = httpx.post(f"{url}/v1/completions", json=body)
                assert r.status_code == 503
                assert r.json()["error"]["code"] == "queue_full"
            _wait_idle(eng, 10)
            assert eng.stats.finished["cancelled"] == 2 and eng.stats.requests_rejected == 1
    finally:
        eng.stop()


def test_health_is_503_while_loading(llm: LLM) -> None:
    release = threading.Event()

    def loader() -> Engine:
        release.wait(30)
        return Engine(llm, n_parallel=1, n_ctx=32)

    with serve(create_app(ServerConfig(), loader=loader)) as url:
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        release.set()
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.post(f"{url}/v1/completions",
                          json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def _engine_rate(engine: Engine, llm: LLM, prompts: list[str], n: int,
                 bias: dict[int, float]) -> tuple[float, float]:
    """Run ``prompts`` together on the engine (greedy, n tokens each); generated tokens per
    wall-clock second and per CPU second of this process."""
    done = threading.Event()
    left = [len(prompts)]
    counts = [0]

    def on_event(ev: Any) -> None:
        if isinstance(ev, TokenEvent) and ev.token is not None:
            counts[0] += 1
        elif isinstance(ev, DoneEvent):
            left[0] -= 1
            if left[0] == 0:
                done.set()

    params = SamplingParams(temperature=0, logit_bias=bias)
    t0, c0 = time.perf_counter(), time.process_time()
    for p in prompts:
        engine.submit(Request(llm.tokenize(p), params, on_event, max_tokens=n))
    assert done.wait(120)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    assert counts[0] == n * len(prompts)
    return counts[0] / dt, counts[0] / dc


def test_throughput_four_streams_vs_one(base_url: str, engine: Engine, llm: LLM) -> None:
    """Aggregate generation speed of 4 concurrent streams vs 1, on the engine and through
    HTTP; recorded in tests/artifacts/server_throughput.json (or $PYLLM_ARTIFACTS).

    The machine is shared and its load swings within seconds, so 1-stream and 4-stream runs
    alternate and the median of the adjacent pairs' ratios is the result."""
    import statistics

    n = 12
    # greedy, with EOS / end-of-turn banned through logit_bias: every stream makes n tokens
    bias = {t: -100.0 for t in engine.stop_ids}
    _wait_idle(engine)
    pairs = []
    for _ in range(3):
        one = _engine_rate(engine, llm, PROMPTS[1:2], n, bias)
        four = _engine_rate(engine, llm, PROMPTS[:4], n, bias)
        pairs.append((one, four))
    speedup = statistics.median(f[0] / o[0] for o, f in pairs)
    cpu_speedup = statistics.median(f[1] / o[1] for o, f in pairs)

    # A fresh client that may retry connection errors: the engine runs above leave a pooled
    # keep-alive connection idle past uvicorn's keep-alive timeout, and reusing it just as the
    # server closes it is a connection race this throughput measurement is not about.
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=2,
                           timeout=60)

    def http_stream(prompt: str) -> int:
        stream = client.completions.create(model="m", prompt=prompt, max_tokens=n,
                                           temperature=0, stream=True,
                                           logit_bias={str(t): b for t, b in bias.items()},
                                           stream_options={"include_usage": True})
        return list(stream)[-1].usage.completion_tokens

    t0 = time.perf_counter()
    http_one = http_stream(PROMPTS[1]) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        total = sum(pool.map(http_stream, PROMPTS[:4]))
    http_four = total / (time.perf_counter() - t0)
    assert total == 4 * n
    record = {
        "engine_speedup_wall": round(speedup, 2), "engine_speedup_cpu": round(cpu_speedup, 2),
        "engine_pairs_tok_s": [[round(o[0], 2), round(f[0], 2)] for o, f in pairs],
        "http_1_stream_tok_s": round(http_one, 2), "http_4_streams_tok_s": round(http_four, 2),
        "http_speedup": round(http_four / http_one, 2),
        "tokens_per_stream": n, "loadavg_1min": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(), "threads": llm.n_threads,
    }
    out = Path(os.environ.get("PYLLM_ARTIFACTS", ROOT / "tests" / "artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "server_throughput.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nserver throughput: {record}")
    # Speed is a measurement, not a pass/fail criterion (no timed assertions in tests): the
    # figures are recorded above and tracked in the performance issue. Measured on the 2-core
    # box (pyllm/server/README.md): engine 1.93-2.43x, HTTP 1.87-3.5x (4 streams vs 1).
    assert all(o[0] > 0 and f[0] > 0 for o, f in pairs)


# ---- the CLI as a subprocess ----------------------------------------------------------------


def test_cli_serve_and_sigterm(smollm2_path: Path, engine: Engine) -> None:
    """`pyllm serve` comes up and answers the openai client; on SIGTERM a short running stream
    finishes, a long one is cancelled at --shutdown-timeout with a 'shutting down' error, and
    the process exits cleanly."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyllm", "serve", "-m", str(smollm2_path), "--port", str(port),
         "-c", "4096", "--parallel", "2", "--alias", "tiny", "--shutdown-timeout", "4"],
        # outside the checkout: `python -m` puts cwd first on sys.path, and the source tree has
        # no compiled extension unless it is an editable install
        cwd=tempfile.gettempdir(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.1)
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        assert c.models.list().data[0].id == "tiny"
        no_eos = {str(t): -100 for t in engine.stop_ids}
        # long enough to outlast --shutdown-timeout even on a quiet machine (~200 tokens/s)
        long = iter(c.completions.create(model="tiny", prompt="Once upon a time", stream=True,
                                         max_tokens=4000, temperature=0, logit_bias=no_eos))
        next(long)
        short = iter(c.chat.completions.create(model="tiny", stream=True, max_tokens=6,
                                               temperature=0,
                                               messages=[{"role": "user", "content": "Hi"}]))
        assert next(short).choices[0].delta.role == "assistant"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = list(short)  # the short generation completes
        assert rest[-1].choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.APIError, match="shutting down"):
            for chunk in long:  # cancelled at the timeout with an error event, not cut off
                assert chunk.choices[0].finish_reason is None
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert time.monotonic() - t0 < 4 + 10
        output = proc.stdout.read() if proc.stdout else ""
        assert "Traceback" not in output and "listening on" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
