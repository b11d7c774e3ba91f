"""Tool calling through the HTTP server with the official ``openai`` client on SmolLM2 (whose
template has no tool syntax: the generic JSON reply) and with its ChatML layout read as the
Hermes/Qwen ``<tool_call>`` syntax (``--chat-format chatml``): forced calls validate against
their function's schema, streamed calls reassemble to the same calls, tool results reach the
prompt, and bad tools are 400s."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from pyllm.runtime.tool_use import chat_with_tools
from pyllm.server.app import ServerConfig, create_app
from pyllm.server.engine import Engine
from tests.conftest import batching_engine, serve

pytestmark = pytest.mark.model

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
            "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
            "required": ["a", "b"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "maxLength": 60},
            "max_results": {"type": "integer", "minimum": 1, "maximum": 10}},
            "required": ["query"]}}},
]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTIONS = ["What's the weather in Paris?", "What is 17 plus 25?",
             "Find recent news about volcanoes.", "Is it raining in Tokyo right now?",
             "Add 300 and -45 for me.", "Who won the last football world cup?"]


@pytest.fixture(scope="module")
def engine(smollm2_path: Path) -> Iterator[Engine]:
    with batching_engine(smollm2_path) as eng:
        yield eng


@pytest.fixture(scope="module", params=["template", "chatml"])
def client(request: pytest.FixtureRequest, engine: Engine) -> Iterator[Any]:
    """The model's own template (generic syntax), then the ChatML format (Hermes syntax)."""
    fmt = None if request.param == "template" else "chatml"
    with serve(create_app(ServerConfig(model_id="smollm2", chat_format=fmt),
                          engine=engine)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _check_call(call: Any, allowed: set[str]) -> None:
    assert call.type == "function" and call.id
    assert call.function.name in allowed
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def test_required_gives_a_valid_call_every_time(client: Any) -> None:
    for i, question in enumerate(QUESTIONS):
        r = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": question}], tools=TOOLS,
            tool_choice="required", temperature=0.7, seed=i, max_tokens=200)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            _check_call(call, set(SCHEMA_OF))
    # negative control: the validator refuses arguments that break a function's schema
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"a": 1}, SCHEMA_OF["add"])


def test_named_function_and_single_call(client: Any) -> None:
    r = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What's the weather in Oslo?"}],
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
        parallel_tool_calls=False, temperature=0.5, seed=3, max_tokens=200)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    _check_call(calls[0], {"add"})


def test_streamed_calls_reassemble_to_the_same_calls(client: Any) -> None:
    kw: dict[str, Any] = {"model": "smollm2", "tools": TOOLS, "tool_choice": "required",
                          "parallel_tool_calls": True, "temperature": 0.8, "seed": 9,
                          "max_tokens": 300,
                          "messages": [{"role": "user", "content": "Weather in Rome and Oslo?"}]}
    plain = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict[str, str]] = {}
    finish = None
    content = ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += tc.id or ""
            entry["name"] += (tc.function.name or "") if tc.function else ""
            entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == ""
    assert len(calls) >= 2  # several calls, each reassembled from its own deltas
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in plain.message.tool_calls]
    assert all(c["id"] for c in calls.values())


def test_tool_results_go_back_into_the_prompt(client: Any, engine: Engine) -> None:
    call = {"id": "call_w1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_w1", "content": '{"temperature_c": 21}'}]
    r = client.chat.completions.create(model="smollm2", messages=messages, tools=TOOLS,
                                       tool_choice="none", temperature=0, max_tokens=40)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason in ("stop", "length")
    fmt = "chatml" if "chatml" in str(client.base_url) else None
    del fmt  # the prompt itself is checked below, for both layouts
    for chat_format, marker in ((None, '"tool_response"'), ("chatml", "<tool_response>")):
        tokens, _, plan = chat_with_tools(engine, messages, chat_format, TOOLS, "auto")
        prompt = engine.tokenizer.decode(tokens)
        assert marker in prompt and "21" in prompt and "Paris" in prompt
        assert plan is not None
        # tool_choice "none": the tools are not described, the result still is
        tokens, _, plan = chat_with_tools(engine, messages, chat_format, TOOLS, "none")
        prompt = engine.tokenizer.decode(tokens)
        assert plan is None and "21" in prompt and "search" not in prompt


def test_auto_may_answer_in_text(client: Any) -> None:
    """"auto": the model chooses; under the Hermes syntax a reply without a <tool_call> block
    is content, never an error (under the generic syntax the reply is JSON either way)."""
    for i, question in enumerate(QUESTIONS[:3]):
        r = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": question}], tools=TOOLS,
            tool_choice="auto", temperature=0.9, seed=i, max_tokens=60)
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                assert call.function.name in SCHEMA_OF
                json.loads(call.function.arguments)
        else:
            assert choice.message.content and choice.finish_reason in ("stop", "length")


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"tools": [{"type": "function"}]}, "tools", "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "'nope', which is not one of the tools"),
    ({"tool_choice": "required"}, "tool_choice", "no tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "tool_choice must be"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice", "cannot both constrain"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}}}],
      "tool_choice": "required"}, "tools", "uniqueItems"),
])
def test_bad_tools_are_400(client: Any, body: dict[str, Any], param: str, message: str) -> None:
    url = str(client.base_url).rstrip("/")
    full = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    r = httpx.post(f"{url}/chat/completions", json=full, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["param"] == param, err
