"""Request bodies of the HTTP API (pydantic models) and their mapping to engine settings.

Fields follow the OpenAI API plus llama.cpp's extra sampling fields (``top_k``, ``min_p``,
``typical_p``, ``tfs_z``, ``repeat_penalty``, ``repeat_last_n``, ``mirostat`` /
``mirostat_mode``, ``mirostat_tau``, ``mirostat_eta``, ``seed``). An omitted or null sampling
field is "not given": it takes the default of :class:`pyllm.runtime.sampling.SamplingParams`
(llama.cpp's, defined there only), and the values are checked there only, so the server, the CLI and
the Python API give the same answer; a bad one is a 400 naming the field.

Unknown fields are rejected with 400, as the OpenAI API does ("Unrecognized request argument"),
so a typo never silently falls back to a default. A few OpenAI fields that change nothing here
are accepted and ignored (``user``, ``store``, ``metadata``, ``service_tier``); fields that
would change the result in a way this server does not implement are rejected with a message
saying so (``best_of`` > 1, ``suffix``).

Structured output: ``response_format`` (``json_object``, ``json_schema``) on chat completions
and llama.cpp's ``grammar`` (GBNF) and ``json_schema`` on both endpoints become one
:class:`pyllm.runtime.grammar.Grammar`, checked before the request is queued (an invalid one is
a 400 quoting the parser). ``tools``, ``tool_choice`` and ``parallel_tool_calls`` are read by
:mod:`pyllm.runtime.tool_use`.

``n`` > 1 runs n requests from the same prompt together (with a fixed ``seed``, choice i uses
seed + i).

Token limits follow llama.cpp's ``n_predict``: ``max_tokens`` -1 = until an end-of-generation
token or the slot's context is full (also what an absent or null limit means in chat, and null in
completions, whose absent default is OpenAI's 16), 0 = generate nothing (empty text, finish reason
"length"), anything below -1 = 400.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pyllm.errors import GrammarError
from pyllm.runtime.grammar import Grammar, from_response_format
from pyllm.runtime.sampling import InvalidSamplingParam, SamplingParams
from pyllm.runtime.steps import UNTIL_DONE, resolve_max_tokens

# every SamplingParams field is a request field of the same name (tests/test_sampling.py)
_SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))

MAX_STOP = 16  # OpenAI allows 4; llama.cpp any number. Each costs a scan per token.
MAX_N = 8  # choices per request
MAX_EMBED_INPUTS = 256  # as the body limit, a bound on the work one request can queue


class UnsupportedFieldError(ValueError):
    """A known OpenAI field with a value this server does not implement."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class LoraEntry(_Strict):
    """One adapter of a request or of POST /lora-adapters: its id (the order of --lora at start)
    and scale."""

    id: int = Field(ge=0)
    scale: float


class LoraList(_Strict):
    adapters: list[LoraEntry] = Field(max_length=256)


class _Sampling(_Strict):
    """Sampling fields shared by completions and chat completions. Each SamplingParams field is
    here under its own name (``mirostat`` also as llama-cpp-python's ``mirostat_mode``), None
    meaning "the SamplingParams default"; only the type is checked here."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    tfs_z: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    mirostat: int | None = Field(None, alias="mirostat_mode")
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)  # choices: n requests decoded together
    # llama.cpp's constrained-output fields (GBNF text; a JSON schema)
    grammar: str | None = None
    json_schema: dict[str, Any] | bool | None = None
    # llama.cpp's per-request LoRA adapters (unlisted ones: scale 0); absent = global scales
    lora: list[LoraEntry] | None = Field(None, max_length=256)
    # accepted and ignored: they do not change the output
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return v

    def check_supported(self) -> None:
        """Raise UnsupportedFieldError for a known field this server does not implement."""

    def sampling_params(self) -> SamplingParams:
        """SamplingParams from the fields that were given: a value SamplingParams refuses is an
        ApiError 400 whose ``param`` names the field (other SamplingErrors pass through)."""
        try:
            return SamplingParams.from_kwargs(**{k: getattr(self, k) for k in _SAMPLING_FIELDS})
        except InvalidSamplingParam as e:
            raise ApiError(400, str(e), param=e.param) from None

    def grammar_spec(self) -> Grammar | None:
        """The one constraint of the request (None: free text); 400 naming the field when two
        are given or one cannot be used. Compiles it (cached per distinct source)."""
        given = self._constraints()
        if len(given) > 1:
            raise ApiError(400, f"give one of {' and '.join(n for n, _ in given)}, not both",
                           param=given[1][0])
        if not given:
            return None
        param, make = given[0]
        try:
            return make().check()
        except GrammarError as e:
            raise ApiError(400, str(e), param=param) from None

    def _constraints(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        if self.grammar is not None:
            text = self.grammar
            out.append(("grammar", lambda: Grammar.gbnf(text)))
        if self.json_schema is not None:
            schema = self.json_schema
            out.append(("json_schema", lambda: Grammar.json_schema(schema)))
        return out

    def lora_mix(self) -> list[tuple[int, float]] | None:
        return None if self.lora is None else [(e.id, e.scale) for e in self.lora]

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    """POST /v1/completions (a single prompt: text, or token ids)."""

    model: str | None = None
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(16, ge=UNTIL_DONE)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, p: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(p, list) and not p:
            raise ValueError("the prompt is empty")
        if isinstance(p, list) and isinstance(p[0], str):
            if len(p) != 1:
                raise ValueError("only one prompt per request is supported (send several "
                                 "requests; they are batched together)")
            return str(p[0])
        return p

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise UnsupportedFieldError("suffix", "suffix (fill-in-the-middle) is not supported")
        if self.best_of not in (None, 1):
            raise UnsupportedFieldError("best_of", "only best_of=1 is supported")

    def token_limit(self) -> int | None:
        return resolve_max_tokens(self.max_tokens)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Clients send extra keys on messages (name, tool_call_id, refusal...): kept out of the
    # prompt unless the template uses them, so extra keys are allowed here.
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool result: the call it answers
    name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": content or ""}
        for key in ("tool_calls", "tool_call_id", "name"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


class JsonSchemaFormat(_Strict):
    """``response_format.json_schema``: OpenAI's named schema (``strict`` is always honoured:
    the output is constrained to the schema either way)."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    # llama.cpp's spelling: {"type": "json_object", "schema": {...}}
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")

    def grammar(self) -> Grammar | None:
        return from_response_format(self.model_dump(by_alias=True, exclude_none=True))


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=UNTIL_DONE)
    max_completion_tokens: int | None = Field(None, ge=UNTIL_DONE)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def _constraints(self) -> list[tuple[str, Any]]:
        out = super()._constraints()
        fmt = self.response_format
        if fmt is not None and fmt.type != "text":
            out.insert(0, ("response_format", fmt.grammar))
        return out

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise UnsupportedFieldError("top_logprobs", "top_logprobs needs logprobs=true")

    def token_limit(self) -> int | None:
        limit = self.max_completion_tokens
        return resolve_max_tokens(self.max_tokens if limit is None else limit)


class EmbeddingRequest(_Strict):
    """POST /v1/embeddings: one input or a list (texts, or token-id lists)."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _inputs(cls, v: str | list[str] | list[int] | list[list[int]]
                ) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(v, list) and not v:
            raise ValueError("input is empty")
        if isinstance(v, list) and len(v) > MAX_EMBED_INPUTS:
            raise ValueError(f"at most {MAX_EMBED_INPUTS} inputs per request")
        return v

    def inputs(self) -> list[str | list[int]]:
        """Each input: a text or a list of token ids."""
        v = self.input
        if isinstance(v, str):
            return [v]
        if isinstance(v[0], int):
            return [[int(t) for t in v]]  # type: ignore[union-attr]
        return list(v)  # type: ignore[arg-type]


class TokenizeRequest(_Strict):
    """POST /tokenize (llama.cpp server shape)."""

    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Strict):
    """POST /detokenize."""

    tokens: list[int]


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type_, param, code)
