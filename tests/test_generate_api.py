"""The generation API on the real model: generate/stream/chat and the OpenAI-shaped results."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pyllm.chat import render, stop_strings
from pyllm.errors import ContextError, SamplingError
from pyllm.runtime.generation import chat_prompt
from pyllm.runtime.llm import LLM
from pyllm.runtime.sampling import SamplingParams

pytestmark = pytest.mark.model

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def llm(smollm2_path: Path) -> LLM:
    with LLM(smollm2_path, n_ctx=512) as m:
        yield m  # type: ignore[misc]


def test_generate_greedy(llm: LLM) -> None:
    text = llm.generate("The capital of France is", max_tokens=8, **GREEDY)
    assert "Paris" in text


def test_stream_equals_generate(llm: LLM) -> None:
    a = llm.generate("Water boils at", max_tokens=20, **GREEDY)
    b = "".join(llm.stream("Water boils at", max_tokens=20, **GREEDY))
    assert a == b and len(a) > 10


def test_seed_reproducible_and_different(llm: LLM) -> None:
    kw = {"max_tokens": 24, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    a = llm.generate("My favourite animal is", seed=3, **kw)
    b = llm.generate("My favourite animal is", seed=3, **kw)
    c = llm.generate("My favourite animal is", seed=4, **kw)
    assert a == b
    assert a != c


def test_stop_string_not_emitted(llm: LLM) -> None:
    full = llm.generate("Count: 1, 2, 3,", max_tokens=30, **GREEDY)
    assert " 5," in full
    cut = llm.generate("Count: 1, 2, 3,", max_tokens=30, stop=["5"], **GREEDY)
    assert cut == full[: full.index("5")]


def test_finish_reasons_and_usage(llm: LLM) -> None:
    out = llm.create_completion("Once upon a time", max_tokens=5, **GREEDY)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    choice = out["choices"][0]
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert out["usage"]["completion_tokens"] == 5
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 5
    out = llm.create_completion("The capital of France is", max_tokens=40, stop=["."],
                                **GREEDY)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert "." not in out["choices"][0]["text"]


def test_completion_stream_chunks(llm: LLM) -> None:
    chunks = list(llm.create_completion("Once upon a time", max_tokens=12, stream=True,
                                        **GREEDY))
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == llm.create_completion("Once upon a time", max_tokens=12,
                                         **GREEDY)["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_logprobs(llm: LLM) -> None:
    out = llm.create_completion("The capital of France is", max_tokens=4, logprobs=3, **GREEDY)
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert chosen <= 0.0 and len(top) == 3
        assert math.isclose(chosen, max(top.values()), abs_tol=1e-6)  # greedy = the top one


def test_chat_completion(llm: LLM) -> None:
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
    out = llm.create_chat_completion(msgs, max_tokens=48, **GREEDY)
    assert out["object"] == "chat.completion"
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and "Paris" in msg["content"]
    assert "<|im_end|>" not in msg["content"]
    assert out["choices"][0]["finish_reason"] == "stop"  # ended by the end-of-turn token
    chunks = list(llm.create_chat_completion(msgs, max_tokens=48, stream=True, **GREEDY))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == msg["content"]
    assert llm.chat(msgs, max_tokens=48, **GREEDY) == msg["content"]


def test_named_chat_format(llm: LLM) -> None:
    msgs = [{"role": "user", "content": "Say hello."}]
    chatml = llm.tokenize(render(msgs, "chatml"), add_special=False, parse_special=True)
    own, _ = chat_prompt(llm, msgs, None)  # SmolLM2's template adds a default system turn
    assert chatml != own
    reply = llm.chat(msgs, chat_format="chatml", max_tokens=16, **GREEDY)
    # The context the model decoded starts with exactly the chatml prompt...
    assert llm.tokens[: len(chatml)] == chatml
    # ...and the reply is the greedy continuation of that prompt, stopped where chatml stops.
    assert reply == llm.generate(chatml, max_tokens=16, stop=stop_strings("chatml"), **GREEDY)
    # The model's own template gives another prompt and so another reply.
    default = llm.chat(msgs, max_tokens=16, **GREEDY)
    assert llm.tokens[: len(own)] == own
    assert reply and default and reply != default


def test_bad_sampling_values(llm: LLM) -> None:
    for kw in ({"top_p": 0.0}, {"temperature": -1.0}, {"mirostat": 5}, {"no_such_knob": 1}):
        with pytest.raises(SamplingError):
            llm.generate("hi", max_tokens=2, **kw)


def test_prompt_longer_than_context(smollm2_path: Path) -> None:
    with LLM(smollm2_path, n_ctx=16) as small:
        with pytest.raises(ContextError):
            small.generate("word " * 40, max_tokens=4)
        # generation stops with "length" when the context fills up, never overruns it
        out = small.create_completion("One two three", max_tokens=100, **GREEDY)
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["total_tokens"] <= 16


def test_llm_seed_is_the_default(smollm2_path: Path) -> None:
    kw = {"max_tokens": 16, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    with LLM(smollm2_path, n_ctx=64, seed=11) as a, LLM(smollm2_path, n_ctx=64, seed=11) as b:
        assert a.generate("A story:", **kw) == b.generate("A story:", **kw)


def test_a_built_sampling_params_is_used_as_given(llm: LLM) -> None:
    # what the CLI does: build (and check) SamplingParams once, then hand the object on
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=21)
    kw = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 21}
    text = llm.generate("A story:", max_tokens=12, sampling_params=params)
    assert text == llm.generate("A story:", max_tokens=12, **kw)
    assert text != llm.generate("A story:", max_tokens=12, **{**kw, "seed": 22})  # control
    msgs = [{"role": "user", "content": "Name a colour."}]
    assert (llm.chat(msgs, max_tokens=8, sampling_params=SamplingParams(temperature=0))
            == llm.chat(msgs, max_tokens=8, temperature=0))
    with pytest.raises(SamplingError, match="not both"):
        llm.generate("hi", max_tokens=2, sampling_params=params, temp=0.5)
    with pytest.raises(SamplingError, match="must be a SamplingParams"):
        llm.generate("hi", max_tokens=2, sampling_params={"temperature": 0})


def test_logprob_shapes_whole_and_streamed(llm: LLM) -> None:
    """The two logprob shapes, whole and streamed, agree with each other and the text."""
    prompt = "The capital of France is"
    out = llm.create_completion(prompt, max_tokens=4, logprobs=2, echo=True, **GREEDY)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith(prompt) and lp["text_offset"][0] == len(prompt)
    for token, offset in zip(lp["tokens"], lp["text_offset"], strict=True):
        assert choice["text"][offset:offset + len(token)] == token
    chunks = list(llm.create_completion(prompt, max_tokens=4, logprobs=2, stream=True,
                                        **GREEDY))
    with_lp = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert [t for c in with_lp for t in c["tokens"]] == lp["tokens"]
    # (the values may differ in the last digits: a second run reuses the cached prompt)
    assert [list(c["top_logprobs"][0]) for c in with_lp] == [list(t) for t in lp["top_logprobs"]]
    assert all(c["text_offset"] == [0] for c in with_lp)
    assert chunks[-1]["usage"]["completion_tokens"] == out["usage"]["completion_tokens"] == 4

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    whole = llm.create_chat_completion(msgs, max_tokens=4, logprobs=True, top_logprobs=2,
                                       **GREEDY)
    content = whole["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert list(entry) == ["token", "logprob", "bytes", "top_logprobs"]
        assert entry["bytes"] == list(entry["token"].encode())
        assert [list(t) for t in entry["top_logprobs"]] == [["token", "logprob", "bytes"]] * 2
    chunks = list(llm.create_chat_completion(msgs, max_tokens=4, logprobs=True, top_logprobs=2,
                                             stream=True, **GREEDY))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    streamed = [e for c in chunks[1:-1] for e in c["choices"][0]["logprobs"]["content"]]
    assert [(e["token"], e["bytes"], [t["token"] for t in e["top_logprobs"]])
            for e in streamed] == [(e["token"], e["bytes"], [t["token"] for t in e["top_logprobs"]])
                                   for e in content]
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["usage"] == whole["usage"]
