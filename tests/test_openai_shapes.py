"""The OpenAI response shapes of pyllm.runtime.openai_shapes: exact dicts (and key order, which is
what the JSON a client reads is written in) for given pieces."""

from __future__ import annotations

import json
import re

from pyllm.runtime import openai_shapes as shapes
from pyllm.runtime.openai_shapes import Head, TokenLogprobs

HEAD = Head("cmpl-abc", 1700000000, "m.gguf")
CHAT_HEAD = Head("chatcmpl-abc", 1700000001, "m.gguf")

# "Hé" then "llo": the second token shows no text yet (held back, e.g. a possible stop prefix)
ENTRIES = [
    TokenLogprobs("Hé", -0.5, [("Hé", -0.5), ("Hi", -1.25)], "Hé"),
    TokenLogprobs("llo", -0.125, [("llo", -0.125)], ""),
    TokenLogprobs("!", -2.0, [], "llo!"),
]


def test_usage_totals() -> None:
    assert shapes.usage(7, 3) == {"prompt_tokens": 7, "completion_tokens": 3,
                                  "total_tokens": 10}


def test_new_heads_have_the_openai_id_prefixes() -> None:
    c, ch = Head.completion("m"), Head.chat("m")
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", c.id) and c.model == "m"
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", ch.id) and isinstance(ch.created, int)
    assert Head.completion("m").id != c.id


def test_completion_logprobs_offsets_follow_the_released_text() -> None:
    assert shapes.completion_logprobs(ENTRIES, 4) == {
        "tokens": ["Hé", "llo", "!"],
        "token_logprobs": [-0.5, -0.125, -2.0],
        "top_logprobs": [{"Hé": -0.5, "Hi": -1.25}, {"llo": -0.125}, {}],
        "text_offset": [4, 6, 6],
    }
    assert shapes.completion_logprobs([], 0) == {
        "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def test_chat_logprobs_carry_utf8_bytes() -> None:
    assert shapes.chat_logprobs(ENTRIES[:2]) == {"content": [
        {"token": "Hé", "logprob": -0.5, "bytes": [72, 195, 169], "top_logprobs": [
            {"token": "Hé", "logprob": -0.5, "bytes": [72, 195, 169]},
            {"token": "Hi", "logprob": -1.25, "bytes": [72, 105]}]},
        {"token": "llo", "logprob": -0.125, "bytes": [108, 108, 111], "top_logprobs": [
            {"token": "llo", "logprob": -0.125, "bytes": [108, 108, 111]}]},
    ]}
    assert shapes.chat_logprobs([]) == {"content": []}


def test_whole_completion() -> None:
    out = shapes.completion(HEAD, [shapes.completion_choice(0, "Hello", None, "length")],
                            shapes.usage(2, 3))
    assert json.dumps(out) == json.dumps({
        "id": "cmpl-abc", "object": "text_completion", "created": 1700000000,
        "model": "m.gguf",
        "choices": [{"text": "Hello", "index": 0, "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}})


def test_completion_chunks() -> None:
    lp = shapes.completion_logprobs(ENTRIES[:1], 0)
    assert json.dumps(shapes.completion_chunk(HEAD, 1, "Hé", lp)) == json.dumps({
        "id": "cmpl-abc", "object": "text_completion", "created": 1700000000,
        "model": "m.gguf", "choices": [{"text": "Hé", "index": 1, "logprobs": lp,
                                        "finish_reason": None}]})
    # the Python API's last chunk: the finish reason and the usage together
    last = shapes.completion_chunk(HEAD, 0, "", None, "stop", shapes.usage(2, 1))
    assert json.dumps(last) == json.dumps({
        "id": "cmpl-abc", "object": "text_completion", "created": 1700000000,
        "model": "m.gguf",
        "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}})
    # the server's usage chunk, sent after every choice's last chunk
    assert json.dumps(shapes.usage_chunk(HEAD, shapes.TEXT_COMPLETION, shapes.usage(2, 6))) == \
        json.dumps({"id": "cmpl-abc", "object": "text_completion", "created": 1700000000,
                    "model": "m.gguf", "choices": [],
                    "usage": {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}})


def test_whole_chat_completion() -> None:
    lp = shapes.chat_logprobs(ENTRIES[2:])
    out = shapes.chat_completion(CHAT_HEAD, [shapes.chat_choice(0, "Paris.", None, "stop"),
                                             shapes.chat_choice(1, "Lyon", lp, "length")],
                                 shapes.usage(9, 4))
    assert json.dumps(out) == json.dumps({
        "id": "chatcmpl-abc", "object": "chat.completion", "created": 1700000001,
        "model": "m.gguf", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Paris."},
             "logprobs": None, "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "content": "Lyon"},
             "logprobs": {"content": [{"token": "!", "logprob": -2.0, "bytes": [33],
                                       "top_logprobs": []}]},
             "finish_reason": "length"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}})


def _chunk(index: int, delta: dict[str, object], logprobs: object = None,
           finish: str | None = None) -> dict[str, object]:
    return {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "created": 1700000001,
            "model": "m.gguf", "choices": [{"index": index, "delta": delta,
                                            "logprobs": logprobs, "finish_reason": finish}]}


def test_chat_chunks() -> None:
    # first delta: the API sends the role only, the server the role and an empty content
    assert json.dumps(shapes.chat_chunk(CHAT_HEAD, 0, shapes.role_delta())) == \
        json.dumps(_chunk(0, {"role": "assistant"}))
    assert json.dumps(shapes.chat_chunk(CHAT_HEAD, 2, shapes.role_delta(""))) == \
        json.dumps(_chunk(2, {"role": "assistant", "content": ""}))
    lp = shapes.chat_logprobs(ENTRIES[2:])
    assert json.dumps(shapes.chat_chunk(CHAT_HEAD, 0, shapes.content_delta("!"), lp)) == \
        json.dumps(_chunk(0, {"content": "!"}, lp))
    assert json.dumps(shapes.chat_chunk(CHAT_HEAD, 1, shapes.end_delta(), None, "stop")) == \
        json.dumps(_chunk(1, {}, None, "stop"))
    last = shapes.chat_chunk(CHAT_HEAD, 0, shapes.end_delta(), None, "length",
                             shapes.usage(5, 2))
    assert json.dumps(last) == json.dumps(
        {**_chunk(0, {}, None, "length"),
         "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})
    assert shapes.usage_chunk(CHAT_HEAD, shapes.CHAT_COMPLETION_CHUNK, shapes.usage(5, 4)) == {
        "id": "chatcmpl-abc", "object": "chat.completion.chunk", "created": 1700000001,
        "model": "m.gguf", "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}}
