"""pyllm serve: the batching engine and the OpenAI-compatible HTTP API on SmolLM2.

Servers run in-process (uvicorn on a thread, free loopback port) around one shared engine; the
CLI tests start ``pyllm serve`` as a subprocess. Clients are the official ``openai`` package,
unchanged, and httpx or a raw socket for what it cannot send (malformed bodies, hang-ups, no Host
header). Greedy outputs are checked against the single-sequence path (``LLM.generate``), so
batching must not change results.

Nothing here depends on how fast the machine decodes: where a test needs a generation to still
be running (hang-ups, a full queue, shutdown), it holds the engine's scheduler between steps with
``Engine.pause`` / ``Engine.resume(steps=N)``; deadlines only turn a hang into a failure. The
throughput of 4 streams vs 1 is measured by ``bench/bench_server.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from pyllm.cli.serve import bind_socket, make_server
from pyllm.errors import ContextError, SamplingError
from pyllm.runtime.llm import LLM
from pyllm.runtime.sampling import DEFAULTS, SamplingParams
from pyllm.server import app as app_module
from pyllm.server import guard as guard_module
from pyllm.server.app import ServerConfig, cancel_all, create_app
from pyllm.server.engine import DoneEvent, Engine, Request, TokenEvent
from tests.conftest import HANG_GUARD, serve, wait_until

pytestmark = pytest.mark.model  # every test serves SmolLM2

N_CTX = 256  # per slot

PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "def fib(n):",
           "The quick brown fox", "My favourite colour is"]


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


def _wait_idle(engine: Engine) -> None:
    wait_until(lambda: not engine.active and not engine.queue_depth,
              f"an idle engine ({engine.active} active, {engine.queue_depth} queued)")


@contextlib.contextmanager
def paused(engine: Engine) -> Iterator[Engine]:
    """The engine's scheduler held before its next step; it runs freely again afterwards."""
    engine.pause()
    try:
        yield engine
    finally:
        engine.resume()


def _no_eos(engine: Engine) -> dict[str, int]:
    """logit_bias that bans end-of-generation: the output runs to its token limit."""
    return {str(t): -100 for t in engine.stop_ids}


# ---- engine -----------------------------------------------------------------------------------


class _Events:
    """An engine request's ``on_event``: keeps the events; ``done`` is set by the DoneEvent."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.done = threading.Event()

    def __call__(self, ev: Any) -> None:
        self.events.append(ev)
        if isinstance(ev, DoneEvent):
            self.done.set()


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
    on_event = _Events()
    events, done = on_event.events, on_event.done

    engine.submit(Request(llm.tokenize("1, 2, 3, 4,"), SamplingParams(temperature=0), on_event,
                          max_tokens=8, stop=[" 6"]))
    assert done.wait(30)
    text = "".join(e.text for e in events if isinstance(e, TokenEvent))
    assert text == full[:full.index(" 6")]
    assert events[-1].finish_reason == "stop"
    done.clear()
    events.clear()
    engine.submit(Request(llm.tokenize("Hi"), SamplingParams(), on_event, max_tokens=0))
    assert done.wait(HANG_GUARD)
    assert events == [DoneEvent("length", len(llm.tokenize("Hi")), 0)]


def test_engine_and_python_api_share_one_step_machine(llm: LLM, engine: Engine) -> None:
    """The server and LLM.create_completion run the same per-token steps: same tokens, same
    text pieces, and logprobs from the same computation (so equal, not merely close)."""
    prompt = llm.tokenize("The capital of France is")
    on_event = _Events()
    events, done = on_event.events, on_event.done

    engine.submit(Request(prompt, SamplingParams(temperature=0), on_event, max_tokens=6,
                          stop=[" capital"], logprobs=3))
    assert done.wait(30)
    out = llm.create_completion(prompt, max_tokens=6, stop=[" capital"], logprobs=3,
                                temperature=0)
    tokens = [e for e in events if isinstance(e, TokenEvent) and e.logprob is not None]
    lp = out["choices"][0]["logprobs"]
    assert [llm.tokenizer.token_to_piece(e.token) for e in tokens] == lp["tokens"]
    assert [e.logprob.logprob for e in tokens] == lp["token_logprobs"]
    assert [{llm.tokenizer.token_to_piece(t): v for t, v in e.logprob.top_logprobs}
            for e in tokens] == lp["top_logprobs"]
    text = "".join(e.text for e in events if isinstance(e, TokenEvent))
    assert text == out["choices"][0]["text"]
    assert events[-1].finish_reason == out["choices"][0]["finish_reason"]


def test_engine_max_tokens_minus_one_runs_until_the_context_is_full(llm: LLM) -> None:
    """llama.cpp's n_predict: -1 (and None) = until end-of-generation or a full slot; below -1
    is refused."""
    eng = Engine(llm, n_parallel=1, n_ctx=32)
    try:
        prompt = llm.tokenize("Once upon a time")
        no_eos = SamplingParams(temperature=0, logit_bias={t: -100.0 for t in eng.stop_ids})
        ends = []
        for limit in (-1, None):
            on_event = _Events()
            eng.submit(Request(prompt, no_eos, on_event, max_tokens=limit))
            assert on_event.done.wait(HANG_GUARD)
            ends.append(on_event.events[-1])
        full = DoneEvent("length", len(prompt), 32 - len(prompt))  # prompt + output = n_ctx
        assert ends == [full, full]
        with pytest.raises(SamplingError, match="max_tokens must be -1"):
            eng.submit(Request(prompt, no_eos, lambda ev: None, max_tokens=-2))
    finally:
        eng.stop()


def test_engine_cancel_mid_prompt(llm: LLM) -> None:
    """A long prompt is fed in chunks of n_batch; cancelling during it frees the slot at the
    next step, before the rest of the prompt is evaluated."""
    eng = Engine(llm, n_parallel=1, n_ctx=512, n_batch=16)
    try:
        on_event = _Events()
        events, done = on_event.events, on_event.done

        prompt = llm.tokenize("one two three four five six seven " * 40)[:400]
        eng.pause()
        handle = eng.submit(Request(prompt, SamplingParams(temperature=0), on_event,
                                    max_tokens=4))
        eng.resume(steps=2)  # two chunks of 16 of the 400-token prompt, then hold
        assert eng.wait_held(HANG_GUARD)
        assert eng.stats.steps_total == 2 and eng.active == 1
        handle.cancel()
        eng.resume()
        assert done.wait(HANG_GUARD)
        assert events == [DoneEvent("cancelled", len(prompt), 0)]
        # freed at the next step: the other 23 chunks were never evaluated
        assert eng.active == 0 and eng.stats.steps_total == 2
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
    values = _metrics(base_url)
    assert values["pyllm_requests_total"] >= 1
    assert values["pyllm_completion_tokens_total"] >= 1
    assert values["pyllm_queue_depth"] == 0 and values["pyllm_slots_total"] == 4
    assert "pyllm_tokens_per_second" in values
    assert values['pyllm_http_requests_total{route="/tokenize",status="200"}'] == 2


def _metrics(base_url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_requests_total_counts_generation_requests_as_its_help_says(
        client: Any, base_url: str, engine: Engine) -> None:
    """pyllm_requests_total counts generations (one per choice), not embedding inputs; those
    are pyllm_embeddings_total."""
    assert engine.supports_embeddings  # the extension built with pyllm has Context.embed
    help_line = next(line for line in httpx.get(f"{base_url}/metrics").text.splitlines()
                     if line.startswith("# HELP pyllm_requests_total "))
    assert "Generation requests" in help_line and "one per choice" in help_line
    before = _metrics(base_url)
    client.embeddings.create(model="m", input=["one", "two", "three"])
    after = _metrics(base_url)
    assert after["pyllm_embeddings_total"] == before["pyllm_embeddings_total"] + 3
    assert after["pyllm_requests_total"] == before["pyllm_requests_total"]
    client.completions.create(model="m", prompt="Hi", max_tokens=1, n=2)
    assert _metrics(base_url)["pyllm_requests_total"] == before["pyllm_requests_total"] + 2


def test_props_gives_the_sampling_defaults_and_the_server_settings(
        base_url: str, engine: Engine, llm: LLM) -> None:
    """GET /props, under llama.cpp's field names: every sampling default exactly as
    pyllm.runtime.sampling defines it, the slots and their context size, the model."""
    r = httpx.get(f"{base_url}/props")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    props = r.json()
    assert props["total_slots"] == engine.n_parallel == 4
    assert props["model_alias"] == "smollm2"
    assert props["model_path"] == str(llm.model.model_path)
    assert props["chat_template"] == llm.model.chat_template and "<|im_start|>" in props[
        "chat_template"]
    settings = props["default_generation_settings"]
    assert settings["n_ctx"] == N_CTX  # per slot
    params = settings["params"]
    python_defaults = SamplingParams()
    assert set(DEFAULTS) <= set(params)
    for name, value in DEFAULTS.items():
        assert params[name] == value == getattr(python_defaults, name), name
    assert params["logit_bias"] == {}
    # the token limit a chat request gets without max_tokens: until done (-1, as llama.cpp)
    assert params["n_predict"] == params["max_tokens"] == -1
    assert settings["max_tokens_by_route"] == {"/v1/chat/completions": -1,
                                               "/v1/completions": 16}


def test_props_max_tokens_default_is_the_one_the_server_applies(base_url: str,
                                                                engine: Engine) -> None:
    """A completion sent without max_tokens (and unable to end early) stops at exactly the
    limit /props states for /v1/completions."""
    limit = httpx.get(f"{base_url}/props").json()[
        "default_generation_settings"]["max_tokens_by_route"]["/v1/completions"]
    r = httpx.post(f"{base_url}/v1/completions", timeout=HANG_GUARD,
                   json={"prompt": "Once upon a time", "logit_bias": _no_eos(engine)})
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == limit
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_props_is_counted_in_metrics(base_url: str) -> None:
    key = 'pyllm_http_requests_total{route="/props",status="200"}'
    before = _metrics(base_url).get(key, 0)
    for _ in range(2):
        assert httpx.get(f"{base_url}/props").status_code == 200
    assert _metrics(base_url)[key] == before + 2


def test_props_needs_the_api_key(engine: Engine) -> None:
    with serve(create_app(ServerConfig(api_key="s3cret"), engine=engine)) as url:
        r = httpx.get(f"{url}/props")
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/props", headers={"Authorization": "Bearer no"}).status_code == 401
        r = httpx.get(f"{url}/props", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["total_slots"] == engine.n_parallel
        assert httpx.get(f"{url}/props", headers={"X-Api-Key": "s3cret"}).status_code == 200


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


def test_sampling_fields_and_seed(client: Any, llm: LLM) -> None:
    """llama.cpp's extra fields are accepted; a fixed seed repeats the same text; mirostat
    reaches the engine's sampler: the server's text is the library's for the same settings,
    and not what the same seed gives without mirostat."""
    extra = {"top_k": 20, "min_p": 0.1, "typical_p": 0.9, "tfs_z": 0.95, "repeat_penalty": 1.1,
             "repeat_last_n": 32, "mirostat_mode": 0, "mirostat_tau": 4.0, "mirostat_eta": 0.2}
    texts = [client.completions.create(model="m", prompt="Once upon a time", max_tokens=6,
                                       temperature=1.0, seed=1234, extra_body=extra,
                                       presence_penalty=0.5,
                                       frequency_penalty=0.5).choices[0].text
             for _ in range(2)]
    assert texts[0] == texts[1] and texts[0]
    messages = [{"role": "user", "content": "Hi"}]
    mirostat = {"mirostat": 2, "mirostat_tau": 5.0}

    def chat(extra: dict[str, Any]) -> str:
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=12, seed=7,
                                           temperature=1.0, extra_body=extra)
        return str(r.choices[0].message.content)

    with_mirostat = chat(mirostat)
    assert with_mirostat == chat(mirostat)  # repeatable
    assert with_mirostat == llm.chat(messages, max_tokens=12, seed=7, temperature=1.0,
                                     **mirostat)
    assert with_mirostat != chat({"mirostat": 0})  # negative control: it changed the output


def test_openai_embeddings(client: Any, base_url: str, llm: LLM, engine: Engine) -> None:
    """Mean-pooled, L2-normalized embeddings; the openai package asks for base64 by default,
    httpx for floats; both equal ``LLM.embed`` (one text at a time), and embeddings
    computed while a generation runs leave that generation's greedy text unchanged."""
    import numpy as np

    assert engine.supports_embeddings  # the extension built with pyllm has Context.embed
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
    """A client that hangs up mid-stream is cancelled before the next step: the engine is held
    after two steps (so the request is certainly still running), the client hangs up, and once
    the cancellation is in, no further token is generated."""
    cancelled = engine.stats.finished["cancelled"]
    generated = engine.stats.completion_tokens_total
    with paused(engine):
        with httpx.stream("POST", f"{base_url}/v1/completions", timeout=HANG_GUARD,
                          json={"prompt": "Once upon a time", "max_tokens": 200, "stream": True,
                                "temperature": 0, "logit_bias": _no_eos(engine)}) as r:
            assert r.status_code == 200
            engine.resume(steps=2)  # the prompt (first token), then a second token
            assert engine.wait_held(HANG_GUARD)
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # a token arrived: leaving the loop closes the connection
        wait_until(lambda: engine.cancels_pending == 1, "the hang-up to reach the engine")
        assert engine.stats.completion_tokens_total == generated + 2
    _wait_idle(engine)
    assert engine.stats.finished["cancelled"] == cancelled + 1
    assert engine.stats.completion_tokens_total == generated + 2  # nothing after the hang-up


def _raw_request(url: str, method: str, path: str, body: bytes = b"",
                 headers: dict[str, str] | None = None, version: str = "1.1") -> socket.socket:
    """Send one HTTP request on a plain socket (a client that can hang up at any moment, or
    leave out headers httpx always sends); returns the connected socket."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=HANG_GUARD)
    lines = [f"{method} {path} HTTP/{version}", f"Content-Length: {len(body)}",
             "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def _status(sock: socket.socket) -> int:
    with sock:
        head = sock.recv(64).decode("latin-1")
    return int(head.split()[1])


def test_disconnect_non_streaming_request(base_url: str, engine: Engine) -> None:
    """A non-streaming client that gives up while its request waits is cancelled: held before
    admission, it never gets a slot or generates a token."""
    cancelled = engine.stats.finished["cancelled"]
    generated = engine.stats.completion_tokens_total
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me a long story"}],
                       "max_tokens": 200, "temperature": 0}).encode()
    with paused(engine):
        sock = _raw_request(base_url, "POST", "/v1/chat/completions", body,
                            {"Host": "127.0.0.1", "Content-Type": "application/json"})
        assert engine.wait_held(HANG_GUARD)  # submitted: the scheduler holds it
        assert engine.queue_depth == 1
        sock.close()  # the client gives up
        wait_until(lambda: engine.cancels_pending == 1, "the hang-up to reach the engine")
    _wait_idle(engine)
    assert engine.stats.finished["cancelled"] == cancelled + 1
    assert engine.stats.completion_tokens_total == generated


@pytest.mark.parametrize(("body", "status", "param"), [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b"\xff\xfe", 400, None),
    (b"[" * 20000, 400, None),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": "x", "bogus": 1}, 400, "bogus"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -2}, 400, "max_tokens"),
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
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -2},
    {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -5},
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

    r = httpx.post(f"{base_url}/v1/completions", content=chunked(),
                   headers={"Content-Type": "application/json"})
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
        # the scheme name is case-insensitive (RFC 9110); the key itself is not
        for header in ("bearer s3cret", "BEARER s3cret", "Bearer  s3cret"):
            r = httpx.get(f"{url}/v1/models", headers={"Authorization": header})
            assert r.status_code == 200, header
        for header in ("bearer S3CRET", "Basic s3cret", "s3cret", "bearer", "Bearers3cret"):
            r = httpx.get(f"{url}/v1/models", headers={"Authorization": header})
            assert r.status_code == 401, header
        assert httpx.get(f"{url}/v1/models", headers={"X-Api-Key": "s3cret"}).status_code == 200


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
    """1 slot + a queue of 1: a third request is refused with 503 while the first runs (held
    by the scheduler after one step) and the second waits; closing them frees everything."""
    eng = Engine(llm, n_parallel=1, n_ctx=256, max_queue=1)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200,
            "temperature": 0, "stream": True}
    try:
        with serve(create_app(ServerConfig(), engine=eng)) as url, \
                httpx.Client(timeout=HANG_GUARD) as c, paused(eng):
            with c.stream("POST", f"{url}/v1/chat/completions", json=body) as first:
                assert first.status_code == 200
                eng.resume(steps=1)  # the first takes the slot
                assert eng.wait_held(HANG_GUARD)
                with c.stream("POST", f"{url}/v1/chat/completions", json=body) as second:
                    assert second.status_code == 200
                    assert eng.active == 1 and eng.queue_depth == 1
                    r = httpx.post(f"{url}/v1/chat/completions", json=body)
                    assert r.status_code == 503
                    assert r.json()["error"]["code"] == "queue_full"
            wait_until(lambda: eng.cancels_pending == 2, "both hang-ups to reach the engine")
            eng.resume()
            _wait_idle(eng)
            assert eng.stats.finished["cancelled"] == 2 and eng.stats.requests_rejected == 1
    finally:
        eng.stop()


def test_health_is_503_while_loading(llm: LLM) -> None:
    release = threading.Event()

    def loader() -> Engine:
        release.wait(HANG_GUARD)
        return Engine(llm, n_parallel=1, n_ctx=32)

    with serve(create_app(ServerConfig(), loader=loader)) as url:
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        release.set()
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, "the model to load")
        assert httpx.post(f"{url}/v1/completions",
                          json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


# ---- token limits (llama.cpp's n_predict) -----------------------------------------------------


def test_max_tokens_minus_one_zero_and_below(base_url: str, llm: LLM, engine: Engine) -> None:
    """-1 = until end-of-generation or a full slot, 0 = nothing (finish "length", no tokens),
    below -1 = 400 naming max_tokens; on both endpoints, streamed or not."""
    prompt = "Once upon a time"
    n_prompt = len(llm.tokenize(prompt))
    r = httpx.post(f"{base_url}/v1/completions", timeout=HANG_GUARD,
                   json={"prompt": prompt, "max_tokens": -1, "temperature": 0,
                         "logit_bias": _no_eos(engine)}).json()
    # with end-of-generation banned, -1 runs until prompt + output fill the slot
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == N_CTX - n_prompt
    messages = [{"role": "user", "content": "Hi"}]
    until_done = [httpx.post(f"{base_url}/v1/chat/completions", timeout=HANG_GUARD,
                             json={"messages": messages, "temperature": 0, **limit}).json()
                  for limit in ({"max_tokens": -1}, {"max_completion_tokens": -1}, {})]
    assert until_done[0]["choices"] == until_done[1]["choices"] == until_done[2]["choices"]
    assert until_done[0]["choices"][0]["finish_reason"] == "stop"  # it ended by itself
    assert until_done[0]["usage"]["completion_tokens"] > 0

    for path, body in (("/v1/completions", {"prompt": prompt}),
                       ("/v1/chat/completions", {"messages": messages})):
        r = httpx.post(f"{base_url}{path}", json={**body, "max_tokens": 0}, timeout=HANG_GUARD)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice.get("text", choice.get("message", {}).get("content")) == ""
        assert choice["finish_reason"] == "length"
        assert r.json()["usage"]["completion_tokens"] == 0
        with httpx.stream("POST", f"{base_url}{path}", timeout=HANG_GUARD,
                          json={**body, "max_tokens": 0, "stream": True}) as s:
            events = _sse_events(s)
        texts = [c.get("text") or c.get("delta", {}).get("content") or ""
                 for e in events[:-1] for c in e["choices"]]
        assert "".join(texts) == "" and events[-2]["choices"][0]["finish_reason"] == "length"
        r = httpx.post(f"{base_url}{path}", json={**body, "max_tokens": -2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text


# ---- what a web page may not do: other Host names, non-JSON bodies ------------------------------


@pytest.mark.parametrize("host", ["localhost", "localhost:8080", "127.0.0.1:1", "[::1]:8080",
                                  "[::1]", "LocalHost", "localhost."])
def test_loopback_host_names_are_served(base_url: str, host: str) -> None:
    r = httpx.get(f"{base_url}/v1/models", headers={"Host": host})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "localhost.evil.example",
                                  "127.0.0.1.nip.io", "10.0.0.1", "[::2]:80"])
def test_other_host_names_are_refused(base_url: str, host: str) -> None:
    """A DNS-rebinding page reaches 127.0.0.1 under its own name: refused on every path."""
    for method, path in (("GET", "/health"), ("GET", "/"), ("GET", "/v1/models"),
                         ("POST", "/v1/completions")):
        r = httpx.request(method, f"{base_url}{path}", headers={"Host": host},
                          json={"prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 403, (path, r.text)
        err = r.json()["error"]
        assert err["code"] == "host_not_allowed" and "--allowed-hosts" in err["message"]


def test_a_request_without_host_header_is_refused(base_url: str) -> None:
    """HTTP/1.0 allows leaving Host out (HTTP/1.1 does not, and uvicorn refuses that itself);
    without the name the server cannot tell a rebinding page from a local client."""
    assert _status(_raw_request(base_url, "GET", "/health", version="1.0")) == 400
    assert _status(_raw_request(base_url, "GET", "/health", headers={"Host": "localhost"},
                                version="1.0")) == 200


def test_allowed_hosts_option(engine: Engine) -> None:
    with serve(create_app(ServerConfig(allowed_hosts=["my.box", "[fd00::1]"]),
                          engine=engine)) as url:
        for host, status in (("my.box", 200), ("MY.BOX:8080", 200), ("[fd00::1]:80", 200),
                             ("localhost", 200), ("sub.my.box", 403), ("evil.example", 403)):
            assert httpx.get(f"{url}/health", headers={"Host": host}).status_code == status, host
    with serve(create_app(ServerConfig(allowed_hosts=["*"]), engine=engine)) as url:
        assert httpx.get(f"{url}/health", headers={"Host": "any.name"}).status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/embeddings",
                                  "/tokenize", "/detokenize"])
@pytest.mark.parametrize("ctype", ["text/plain", "text/plain; charset=utf-8",
                                   "application/x-www-form-urlencoded", "multipart/form-data",
                                   None])
def test_post_bodies_must_be_json(base_url: str, path: str, ctype: str | None) -> None:
    """The bodies a cross-site page may send without a CORS preflight are refused (415)."""
    body = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
    headers = {"Host": "127.0.0.1"} | ({"Content-Type": ctype} if ctype else {})
    sock = _raw_request(base_url, "POST", path, body, headers)
    with sock:
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.split()[1] == b"415", data
    err = json.loads(payload)["error"]
    assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("ctype", ["application/json", "application/json; charset=utf-8",
                                   "Application/JSON", "application/vnd.example+json"])
def test_json_content_types_are_accepted(base_url: str, ctype: str) -> None:
    r = httpx.post(f"{base_url}/tokenize", content=json.dumps({"content": "Hi"}),
                   headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text


# ---- big requests -------------------------------------------------------------------------------


def test_text_longer_than_a_slot_can_hold_is_refused_before_tokenizing(
        base_url: str, llm: LLM, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """B bytes are at least ceil(B / longest piece) tokens: a prompt beyond that is refused
    (context_length_exceeded) and the tokenizer never sees it; one within it is tokenized."""
    per_token = llm.tokenizer.max_token_bytes
    assert per_token == max(len(llm.tokenizer.token_to_bytes(i)) for i in range(llm.n_vocab))
    calls: list[int] = []
    encode = llm.tokenizer.encode

    def spy(text: str, *args: Any, **kwargs: Any) -> list[int]:
        calls.append(len(text))
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(llm.tokenizer, "encode", spy)
    too_long = "hello " * (per_token * N_CTX // 6 + 1)  # more bytes than N_CTX tokens can hold
    for path, body, param in (
            ("/v1/completions", {"prompt": too_long, "max_tokens": 1}, "prompt"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": too_long}],
                                      "max_tokens": 1}, "messages"),
            ("/v1/embeddings", {"input": ["short", too_long]}, "input")):
        if path == "/v1/embeddings" and not engine.supports_embeddings:
            continue
        r = httpx.post(f"{base_url}{path}", json=body, timeout=HANG_GUARD)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["code"], err["param"]) == ("context_length_exceeded", param), err
        assert calls == [], path
    # negative control: a prompt within the bound is tokenized, then refused by its real length
    long = "hello " * (N_CTX + 10)  # N_CTX + 10 tokens, far fewer bytes than the bound
    r = httpx.post(f"{base_url}/v1/completions", json={"prompt": long, "max_tokens": 1},
                   timeout=HANG_GUARD)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert calls == [len(long)]


def test_memory_is_given_back_after_a_large_body(engine: Engine,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """After a request whose body exceeds 64 KiB, free memory goes back to the OS
    (malloc_trim); small requests do not pay for it."""
    trimmed = threading.Event()
    calls: list[str] = []

    def fake_release() -> bool:
        try:
            asyncio.get_running_loop()
            calls.append("on the event loop")
        except RuntimeError:
            calls.append("off the event loop")
        trimmed.set()
        return True

    monkeypatch.setattr(guard_module, "release_free_memory", fake_release)
    big_body = json.dumps({"tokens": [1] * 30000}).encode()  # 90 KB
    assert len(big_body) > guard_module.LARGE_BODY_BYTES
    json_type = {"Content-Type": "application/json"}
    with serve(create_app(ServerConfig(), engine=engine)) as url:
        small = httpx.post(f"{url}/detokenize", json={"tokens": [1] * 100})
        assert small.status_code == 200
        big = httpx.post(f"{url}/detokenize", content=big_body, headers=json_type)
        assert big.status_code == 200
        assert trimmed.wait(HANG_GUARD)
    assert calls == ["off the event loop"]  # the big one only, on a worker thread


# ---- shutdown ---------------------------------------------------------------------------------


def test_shutdown_lets_running_requests_finish_then_cancels_the_rest(llm: LLM) -> None:
    """The server of `pyllm serve` on SIGTERM: a short generation running at the signal
    finishes; one still running when --shutdown-timeout expires ends with a 'shutting down'
    error event, not a cut connection; then the server exits. The scheduler is held so that the
    long one cannot finish whatever the machine's speed, and the test fires the armed timer
    itself rather than waiting for it."""
    eng = Engine(llm, n_parallel=2, n_ctx=N_CTX)
    app = create_app(ServerConfig(), engine=eng)
    server = make_server(app, shutdown_timeout=600)
    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    chat = {"messages": [{"role": "user", "content": "Tell me a story"}], "temperature": 0,
            "stream": True}
    try:
        wait_until(lambda: server.started, "uvicorn to start")
        with httpx.Client(timeout=HANG_GUARD) as c, paused(eng):
            with c.stream("POST", f"{url}/v1/chat/completions",
                          json={**chat, "max_tokens": -1, "logit_bias": _no_eos(eng)}) as long, \
                    c.stream("POST", f"{url}/v1/chat/completions",
                             json={**chat, "max_tokens": 4}) as short:
                assert long.status_code == short.status_code == 200
                eng.resume(steps=1)  # both prompts evaluated: both running
                assert eng.wait_held(HANG_GUARD) and eng.active == 2
                server.handle_exit(signal.SIGTERM, None)
                assert isinstance(server.timer, threading.Timer)
                assert server.timer.interval == 600 and server.timer.function is cancel_all
                eng.resume(steps=3)  # the short one's other 3 tokens; the long one goes on
                short_events = _sse_events(short)
                assert short_events[-1] == "[DONE]"
                finish = [e["choices"][0]["finish_reason"] for e in short_events[:-1]
                          if e.get("choices")]
                assert finish[-1] == "length" and set(finish[:-1]) == {None}
                assert eng.wait_held(HANG_GUARD) and eng.active == 1  # the long one
                server.timer.cancel()
                server.timer.function(*server.timer.args)  # what the timer does when it fires
                long_events = _sse_events(long)
            assert long_events[-1] == "[DONE]"
            error = long_events[-2]["error"]
            assert error["code"] == "shutting_down" and "shutting down" in error["message"]
            assert all(e["choices"][0]["finish_reason"] is None for e in long_events[:-2])
        thread.join(HANG_GUARD)
        assert not thread.is_alive()
        assert eng.stats.finished["cancelled"] == 1 and eng.stats.finished["length"] == 1
    finally:
        server.should_exit = True
        thread.join(HANG_GUARD)
        eng.stop()


def _sse_events(response: Any) -> list[Any]:
    """The data of every server-sent event until the stream ends ('[DONE]' as a string)."""
    out: list[Any] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---- the CLI as a subprocess ----------------------------------------------------------------


class _Cli:
    """`pyllm serve` as a subprocess; its output lines are collected on a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyllm", "serve", *args],
            # outside the checkout: `python -m` puts cwd first on sys.path, and the source tree
            # has no compiled extension unless it is an editable install
            cwd=tempfile.gettempdir(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, pattern: str) -> re.Match[str]:
        while True:
            line = self.lines.get(timeout=HANG_GUARD)
            assert line is not None, f"exited without {pattern!r}: {''.join(self.output)}"
            self.output.append(line)
            if m := re.search(pattern, line):
                return m

    def finish(self) -> tuple[int, str]:
        """Exit status and the whole output (waits for the process to end)."""
        rc = self.proc.wait(HANG_GUARD)
        while (line := self.lines.get(timeout=HANG_GUARD)) is not None:
            self.output.append(line)
        return rc, "".join(self.output)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _one_error_line(output: str) -> str:
    lines = output.splitlines()
    assert "Traceback" not in output and "listening on" not in output, output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def test_cli_serve_port_0_allowed_hosts_and_sigterm(smollm2_path: Path, engine: Engine) -> None:
    """`pyllm serve --port 0` prints the port it got and answers there (the openai client,
    --alias, --allowed-hosts); on SIGTERM a running stream finishes and the process exits
    cleanly."""
    cli = _Cli("-m", str(smollm2_path), "--port", "0", "-c", "512", "--parallel", "2",
               "--alias", "tiny", "--allowed-hosts", "my.box", "--shutdown-timeout", "600")
    try:
        port = int(cli.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
        assert port != 0
        url = f"http://127.0.0.1:{port}"
        cli.wait_for_line(r"pyllm: serving ")  # printed once the loaded model answers
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/health", headers={"Host": "my.box:80"}).status_code == 200
        assert httpx.get(f"{url}/health", headers={"Host": "evil.example"}).status_code == 403
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        assert c.models.list().data[0].id == "tiny"
        props = httpx.get(f"{url}/props").json()  # the command line's settings
        assert props["total_slots"] == 2 and props["model_alias"] == "tiny"
        assert props["default_generation_settings"]["n_ctx"] == 512
        assert props["model_path"] == str(smollm2_path.resolve())
        stream = iter(c.chat.completions.create(model="tiny", stream=True, max_tokens=6,
                                                temperature=0,
                                                messages=[{"role": "user", "content": "Hi"}]))
        assert next(stream).choices[0].delta.role == "assistant"
        cli.proc.send_signal(signal.SIGTERM)
        rest = list(stream)  # the running generation completes (600 s to do so)
        assert rest[-1].choices[0].finish_reason in ("stop", "length")
        rc, output = cli.finish()
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown
        assert rc in (0, -signal.SIGTERM), output
        assert "Traceback" not in output and "error" not in output
    finally:
        cli.kill()


def _load_failure(model: str, *flags: str) -> str:
    """Run `pyllm serve` on a model whose load fails after the server started listening; check
    that it exits 1 having printed the listening line and one error line; return that line."""
    cli = _Cli("-m", model, "--port", "0", *flags)
    try:
        cli.wait_for_line(r"listening on http://127\.0\.0\.1:\d+")
        rc, output = cli.finish()
    finally:
        cli.kill()
    assert rc == 1, output
    lines = output.splitlines()
    assert lines[0].startswith("pyllm: listening on") and "Traceback" not in output
    assert len(lines) == 2, output
    return lines[1]


def test_cli_serve_missing_or_malformed_model_is_one_error_line(tmp_path: Path) -> None:
    """A model that cannot load ends `pyllm serve` with one error line and exit 1: a missing
    file before anything is announced; a malformed one (found by the load on its thread) stops
    the server that was already listening."""
    cli = _Cli("-m", str(tmp_path / "nope.gguf"), "--port", "0")
    try:
        rc, output = cli.finish()
    finally:
        cli.kill()
    assert rc == 1
    assert "nope.gguf" in _one_error_line(output)

    bad = tmp_path / "bad.gguf"  # the magic and version of a GGUF, then an absurd tensor count
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 100)
    error = _load_failure(str(bad))
    assert error.startswith("error: ") and "bad.gguf" in error


def test_cli_serve_bad_flags_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from pyllm.cli import main

    for flags in (["--port", "70000"], ["--shutdown-timeout", "-1"]):
        with pytest.raises(SystemExit) as e:
            main(["serve", *flags])
        assert e.value.code == 2, flags
        assert capsys.readouterr().err.startswith("error: "), flags


def test_cli_serve_port_in_use_is_one_error_line(smollm2_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cli = _Cli("-m", str(smollm2_path), "--port", str(port))
        try:
            rc, output = cli.finish()
        finally:
            cli.kill()
    assert rc == 1
    line = _one_error_line(output)
    assert f"127.0.0.1:{port}" in line and "in use" in line


def test_cli_serve_context_too_big_for_memory(smollm2_path: Path) -> None:
    """-c x --parallel slots that cannot fit in memory are refused with the sizes, before the
    cache is allocated (it used to allocate until the machine swapped)."""
    error = _load_failure(str(smollm2_path), "-c", "1000000", "--parallel", "16")
    assert error.startswith("error: a context of n_ctx=1000000 x 16 sequences needs 343.5 GiB")
    assert "fewer parallel sequences" in error


def test_engine_refuses_slots_beyond_memory(llm: LLM) -> None:
    with pytest.raises(ContextError, match=r"x 64 sequences needs .* of memory is available"):
        Engine(llm, n_parallel=64, n_ctx=1_000_000)


def test_cli_serve_allocates_only_the_batched_context(
        smollm2_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``pyllm serve`` loads the model and makes ONE context, of --parallel slots: it used to
    make an LLM with its own 64-token single-sequence context only to get at the weights.
    The command runs in-process as far as its load (uvicorn replaced by a server whose run()
    calls the app's loader, as the real one does on its loading thread), counting every
    ``_core.Context`` made. Prompts are tokenized against the slots' context: with the small
    LLM's, a prompt over 64 x 81 bytes (81: SmolLM2's longest token) was refused."""
    from pyllm import _core
    from pyllm.cli import main
    from pyllm.cli import serve as serve_module

    made: list[dict[str, Any]] = []
    real_context = _core.Context

    def counting_context(*args: Any, **kwargs: Any) -> Any:
        made.append(kwargs)
        return real_context(*args, **kwargs)

    loaded: list[Engine] = []

    class LoadOnlyServer:
        should_exit = False

        def __init__(self, hooks: dict[str, Any]) -> None:
            self.hooks = hooks

        def run(self, sockets: list[socket.socket]) -> None:
            engine = self.hooks["loader"]()
            self.hooks["on_ready"](engine)
            loaded.append(engine)

    def fake_create_app(config: ServerConfig, **hooks: Any) -> dict[str, Any]:
        return hooks

    real_create_app = app_module.create_app
    monkeypatch.setattr(_core, "Context", counting_context)
    monkeypatch.setattr(app_module, "create_app", fake_create_app)
    monkeypatch.setattr(serve_module, "make_server", lambda app, timeout, **_: LoadOnlyServer(app))
    assert main(["serve", "-m", str(smollm2_path), "--port", "0", "-c", "1200",
                 "--parallel", "3", "-t", "1"]) == 0
    try:
        assert len(loaded) == 1
        assert [(kw["n_ctx"], kw["n_seq"]) for kw in made] == [(1200, 3)]
        eng = loaded[0]
        assert (eng.n_parallel, eng.n_ctx, eng.n_threads) == (3, 1200, 1)
        assert "3 slots x 1200 tokens, 1 threads" in capsys.readouterr().err
        prompt = "hello world " * 500  # 6000 bytes, 1000 tokens
        assert len(prompt) > 64 * eng.tokenizer.max_token_bytes
        with serve(real_create_app(ServerConfig(), engine=eng)) as url:
            r = httpx.post(f"{url}/v1/completions", timeout=HANG_GUARD,
                           json={"prompt": prompt, "max_tokens": 1, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(eng.tokenizer.encode(prompt))
    finally:
        for eng in loaded:
            eng.stop()
