"""Every OpenAI-shaped dict pyllm returns, built in one place.

The Python API (:mod:`pyllm.runtime.completions`, llama-cpp-python's ``create_completion`` /
``create_chat_completion``) and the HTTP server (:mod:`pyllm.server.app` via
:mod:`pyllm.server.bridge`) both answer in the shapes of the OpenAI API: ``text_completion``
(whole and stream chunks), ``chat.completion`` and ``chat.completion.chunk``, ``usage``, and
logprobs in the completion form (parallel lists with ``text_offset``) and the chat form (a
``content`` list with UTF-8 bytes). The functions here are pure: their callers turn what they
generated (``Piece`` of the API, ``TokenEvent`` of the engine) into :class:`TokenLogprobs` and
plain text, so a new endpoint or field changes this file only.

The few places where the API and the server answer differently are kept as they were, and said
so where they are chosen: the API's streamed completion puts ``usage`` into its final chunk, the
server sends a separate ``choices: []`` usage chunk (``stream_options.include_usage``); the
API's first chat delta is ``{"role": "assistant"}``, the server's also has ``"content": ""``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

TEXT_COMPLETION = "text_completion"
CHAT_COMPLETION = "chat.completion"
CHAT_COMPLETION_CHUNK = "chat.completion.chunk"


@dataclass(frozen=True)
class Head:
    """What every object and chunk of one response shares: its id, creation time and model.
    The ``object`` field is not here: a chat response and its chunks differ in it."""

    id: str
    created: int
    model: str

    @classmethod
    def completion(cls, model: str) -> Head:
        return cls(f"cmpl-{uuid.uuid4().hex}", int(time.time()), model)

    @classmethod
    def chat(cls, model: str) -> Head:
        return cls(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model)

    def fields(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token's log-probabilities, as text: ``token`` the token's own text,
    ``top`` the (text, logprob) alternatives most probable first, and ``released`` the text the
    step showed (what moves the completion form's ``text_offset`` on)."""

    token: str
    logprob: float
    top: Sequence[tuple[str, float]]
    released: str


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- logprobs --------------------------------------------------------------------------------


def completion_logprobs(entries: Iterable[TokenLogprobs], offset: int) -> dict[str, Any]:
    """The completion form: parallel lists; ``text_offset`` counts from ``offset`` (the length
    of an echoed prompt) in characters of the released text."""
    tokens: list[str] = []
    lps: list[float] = []
    tops: list[dict[str, float]] = []
    offsets: list[int] = []
    pos = offset
    for e in entries:
        tokens.append(e.token)
        lps.append(e.logprob)
        tops.append(dict(e.top))
        offsets.append(pos)
        pos += len(e.released)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _token_entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(entries: Iterable[TokenLogprobs]) -> dict[str, Any]:
    """The chat form: ``{"content": [...]}``, each token with its UTF-8 bytes and its top list."""
    return {"content": [{**_token_entry(e.token, e.logprob),
                         "top_logprobs": [_token_entry(t, lp) for t, lp in e.top]}
                        for e in entries]}


# ---- text_completion -------------------------------------------------------------------------


def completion_choice(index: int, text: str, logprobs: dict[str, Any] | None,
                      finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(head: Head, choices: list[dict[str, Any]], usage_: dict[str, int]
               ) -> dict[str, Any]:
    """A whole ``text_completion`` (choices from :func:`completion_choice`)."""
    return {**head.fields(TEXT_COMPLETION), "choices": choices, "usage": usage_}


def completion_chunk(head: Head, index: int, text: str, logprobs: dict[str, Any] | None = None,
                     finish_reason: str | None = None, usage_: dict[str, int] | None = None
                     ) -> dict[str, Any]:
    """One streamed ``text_completion`` chunk of choice ``index``; ``usage_`` only on the API's
    last chunk (the server sends :func:`usage_chunk` instead)."""
    out = {**head.fields(TEXT_COMPLETION),
           "choices": [completion_choice(index, text, logprobs, finish_reason)]}
    if usage_ is not None:
        out["usage"] = usage_
    return out


# ---- chat.completion -------------------------------------------------------------------------


def chat_choice(index: int, content: str | None, logprobs: dict[str, Any] | None,
                finish_reason: str | None,
                tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One choice of a ``chat.completion``; with ``tool_calls`` (OpenAI's ``{"id", "type",
    "function": {"name", "arguments"}}`` each) the message carries them and ``content`` is the
    text written around them, or None."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_completion(head: Head, choices: list[dict[str, Any]], usage_: dict[str, int]
                    ) -> dict[str, Any]:
    """A whole ``chat.completion`` (choices from :func:`chat_choice`)."""
    return {**head.fields(CHAT_COMPLETION), "choices": choices, "usage": usage_}


def chat_chunk(head: Head, index: int, delta: dict[str, Any],
               logprobs: dict[str, Any] | None = None, finish_reason: str | None = None,
               usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk`` of choice ``index``; ``usage_`` only on the API's last."""
    out = {**head.fields(CHAT_COMPLETION_CHUNK), "choices": [
        {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def role_delta(content: str | None = None) -> dict[str, Any]:
    """The first delta of a streamed chat choice: the role, and (the server's form) an empty
    content."""
    return {"role": "assistant"} if content is None else {"role": "assistant",
                                                           "content": content}


def content_delta(text: str) -> dict[str, Any]:
    return {"content": text}


def tool_calls_delta(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Streamed tool calls: each ``{"index", "id", "type", "function": {"name", "arguments"}}``
    on its first delta, then ``{"index", "function": {"arguments": fragment}}``."""
    return {"tool_calls": calls}


def end_delta() -> dict[str, Any]:
    """The delta of a choice's last chunk, which carries its finish_reason."""
    return {}


def usage_chunk(head: Head, object_: str, usage_: dict[str, int]) -> dict[str, Any]:
    """The server's last chunk with ``stream_options.include_usage``: no choices, the usage of
    all of them."""
    return {**head.fields(object_), "choices": [], "usage": usage_}
