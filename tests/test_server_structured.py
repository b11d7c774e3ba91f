"""Structured output through the HTTP server with the official ``openai`` client on SmolLM2:
``response_format`` (json_object, json_schema), llama.cpp's ``grammar`` / ``json_schema``
fields on both endpoints, streamed and batched, and the 400s for what cannot be used."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from pyllm.server.app import ServerConfig, create_app
from pyllm.server.engine import Engine
from tests.conftest import batching_engine, serve
from tests.test_grammar import ARITHMETIC, is_arithmetic

pytestmark = pytest.mark.model

# Twenty schemas of the kinds applications send: nested objects, arrays, enums,
# required/optional keys, numbers with bounds, strings with patterns and lengths, unions, refs.
SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 130}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"title": {"type": "string", "maxLength": 60},
                                      "year": {"type": "integer", "minimum": 1900,
                                               "maximum": 2030},
                                      "genres": {"type": "array", "maxItems": 3, "items": {
                                          "enum": ["drama", "comedy", "action", "horror"]}}},
     "required": ["title", "year", "genres"]},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9},
     "minItems": 3, "maxItems": 5},
    {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative",
                                                             "neutral"]},
                                      "confidence": {"type": "number", "minimum": 0,
                                                     "maximum": 1}},
     "required": ["sentiment", "confidence"]},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                      "state": {"type": "string", "pattern": "^[A-Z]{2}$"}},
     "required": ["zip", "state"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1},
        "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"}},
        "required": ["id", "email"]},
        "active": {"type": "boolean"}}, "required": ["user", "active"]},
    {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 3,
                                                "items": {"type": "object", "properties": {
                                                    "sku": {"type": "string",
                                                            "pattern": "^[A-Z]{3}[0-9]{3}$"},
                                                    "qty": {"type": "integer", "minimum": 1,
                                                            "maximum": 10}},
                                                    "required": ["sku", "qty"]}}},
     "required": ["items"]},
    {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 40},
                                      "sources": {"type": "array", "maxItems": 2,
                                                  "items": {"type": "string", "maxLength": 30}}},
     "required": ["answer"]},
    {"type": "object", "properties": {"temperature_c": {"type": "number", "minimum": -50,
                                                        "maximum": 60},
                                      "unit": {"const": "celsius"}},
     "required": ["temperature_c", "unit"]},
    {"enum": ["yes", "no", "maybe"]},
    {"type": "object", "properties": {"x": {"type": "integer", "minimum": -10, "maximum": 10},
                                      "y": {"type": "integer", "minimum": -10, "maximum": 10}},
     "required": ["x", "y"]},
    {"type": "object", "properties": {"date": {"type": "string",
                                               "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
                                      "event": {"type": "string", "maxLength": 40}},
     "required": ["date", "event"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer"},
                                                          {"type": "string", "maxLength": 10}]}},
     "required": ["value"]},
    {"type": "object", "properties": {"tags": {"type": "array", "minItems": 2, "maxItems": 4,
                                               "items": {"type": "string",
                                                         "pattern": "^[a-z]{2,12}$"}}},
     "required": ["tags"]},
    {"type": "object", "$defs": {"point": {"type": "object", "properties": {
        "lat": {"type": "number", "minimum": -90, "maximum": 90},
        "lon": {"type": "number", "minimum": -180, "maximum": 180}}, "required": ["lat", "lon"]}},
     "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
     "required": ["start", "end"]},
    {"type": "object", "properties": {"priority": {"type": "integer", "enum": [1, 2, 3]},
                                      "done": {"type": "boolean"},
                                      "note": {"type": ["string", "null"], "maxLength": 30}},
     "required": ["priority", "done", "note"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "minItems": 2, "maxItems": 2,
                                                 "items": {"type": "array", "minItems": 2,
                                                           "maxItems": 2,
                                                           "items": {"type": "integer",
                                                                     "minimum": 0,
                                                                     "maximum": 9}}}},
     "required": ["matrix"]},
    {"type": "object", "properties": {"color": {"type": "string",
                                                "pattern": "^#[0-9a-f]{6}$"},
                                      "name": {"type": "string", "minLength": 3,
                                               "maxLength": 15}},
     "required": ["color", "name"]},
    {"type": "object", "properties": {"price": {"type": "number", "exclusiveMinimum": 0,
                                                "maximum": 1000},
                                      "currency": {"enum": ["USD", "EUR", "GBP"]},
                                      "discount": {"type": "integer", "minimum": 0,
                                                   "maximum": 50}},
     "required": ["price", "currency"]},
    {"type": "object", "properties": {"steps": {"type": "array", "minItems": 2, "maxItems": 3,
                                                "items": {"type": "object", "properties": {
                                                    "n": {"type": "integer", "minimum": 1,
                                                          "maximum": 3},
                                                    "text": {"type": "string",
                                                             "maxLength": 30}},
                                                    "required": ["n", "text"]}}},
     "required": ["steps"]},
]
PROMPTS = ["Describe a person.", "Tell me about a film.", "Pick some digits.",
           "How does this review feel: 'great phone'?", "Where do you live?", "Create a user.",
           "Make an order.", "What is the tallest mountain?", "Weather report for Oslo.",
           "Is water wet?", "A point on a grid.", "An event in history.", "Any value.",
           "Tag this post about cooking pasta.", "A trip from Paris to Rome.", "A todo item.",
           "A 2x2 matrix.", "A color.", "A product price.", "How to boil an egg."]


@pytest.fixture(scope="module")
def engine(smollm2_path: Path) -> Iterator[Engine]:
    with batching_engine(smollm2_path, slot_ctx=512) as eng:
        yield eng


@pytest.fixture(scope="module")
def base_url(engine: Engine) -> Iterator[str]:
    with serve(create_app(ServerConfig(model_id="smollm2"), engine=engine)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Any:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_twenty_schemas_validate_twenty_times(client: Any) -> None:
    assert len(SCHEMAS) == len(PROMPTS) == 20

    def ask(i: int) -> tuple[str, str | None]:
        r = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": PROMPTS[i]}],
            response_format={"type": "json_schema", "json_schema": {
                "name": f"s{i}", "schema": SCHEMAS[i], "strict": True}},
            temperature=0.7, seed=i, max_tokens=200)
        return r.choices[0].message.content, r.choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:  # batched together by the engine
        results = list(pool.map(ask, range(20)))
    for i, (content, finish) in enumerate(results):
        assert finish == "stop", (i, content)
        jsonschema.validate(json.loads(content), SCHEMAS[i])
    # negative control: the validator rejects a document that breaks a schema
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"zip": "1234", "state": "NY"}, SCHEMAS[4])


def test_json_object_and_llama_cpp_fields(client: Any, base_url: str) -> None:
    r = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Describe a cat as a JSON object."}],
        response_format={"type": "json_object"}, temperature=0.5, seed=0, max_tokens=300)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    # llama.cpp's grammar field on /v1/completions
    for seed in range(4):
        r = client.completions.create(model="smollm2", prompt="Some arithmetic: ", max_tokens=20,
                                      temperature=1.0, seed=seed,
                                      extra_body={"grammar": ARITHMETIC})
        text = r.choices[0].text
        assert is_arithmetic(text) if r.choices[0].finish_reason == "stop" else text, text
    # ... and its json_schema field on both endpoints
    schema = SCHEMAS[3]
    r = client.completions.create(model="smollm2", prompt="Review: great phone. JSON:",
                                  max_tokens=60, temperature=0, extra_body={"json_schema": schema})
    jsonschema.validate(json.loads(r.choices[0].text), schema)
    body = {"messages": [{"role": "user", "content": "yes or no?"}], "max_tokens": 20,
            "json_schema": SCHEMAS[9]}
    out = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60).json()
    assert json.loads(out["choices"][0]["message"]["content"]) in ("yes", "no", "maybe")


def test_streamed_and_plain_constrained_replies_agree(client: Any) -> None:
    kw: dict[str, Any] = {
        "model": "smollm2", "messages": [{"role": "user", "content": "Describe a person."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "p",
                                                                  "schema": SCHEMAS[0]}},
        "temperature": 0.8, "seed": 5, "max_tokens": 100}
    plain = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stream=True, **kw) if c.choices)
    assert streamed == plain
    jsonschema.validate(json.loads(plain), SCHEMAS[0])


def test_free_and_constrained_requests_share_a_batch(client: Any) -> None:
    """A constrained sequence next to free ones in the same batch: each gets its own text (the
    free ones exactly what they get alone)."""
    alone = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=24,
                                      temperature=0).choices[0].text

    def free(_: int) -> str:
        return str(client.completions.create(model="smollm2", prompt="Once upon a time",
                                             max_tokens=24, temperature=0).choices[0].text)

    def digits(_: int) -> str:
        return str(client.completions.create(model="smollm2", prompt="Once upon a time",
                                             max_tokens=24, temperature=0,
                                             extra_body={"grammar": 'root ::= [0-9]{4,8}'}
                                             ).choices[0].text)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(free, 0), pool.submit(digits, 0), pool.submit(free, 1),
                   pool.submit(digits, 1)]
        texts = [f.result() for f in futures]
    assert texts[0] == texts[2] == alone
    assert re.fullmatch(r"[0-9]{4,8}", texts[1]) and texts[1] == texts[3]


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs \"json_schema\""),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, "response_format",
     'JSON schema keyword(s) not supported: ["uniqueItems"]'),
    ({"grammar": "root ::= foo"}, "grammar", "invalid GBNF grammar: Rule 'foo' not found"),
    ({"json_schema": {"type": "string", "pattern": "(("}}, "json_schema",
     "unclosed group at position 2 in regex '(('"),
    ({"grammar": 'root ::= "a"', "json_schema": {}}, "json_schema", "not both"),
    ({"response_format": {"type": "json_object"}, "grammar": 'root ::= "a"'}, "grammar",
     "not both"),
    ({"response_format": {"type": "xml"}}, None, "response_format"),
])
def test_unusable_constraints_are_400(base_url: str, body: dict[str, Any], param: str | None,
                                      message: str) -> None:
    full = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=full, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param


def test_a_grammar_that_cannot_finish_ends_with_length(client: Any) -> None:
    r = client.completions.create(model="smollm2", prompt="x", max_tokens=12, temperature=0,
                                  extra_body={"grammar": 'root ::= "a"+ "b"'})
    text = r.choices[0].text
    # the model may never write the "b": the limit ends it, as a prefix of the language
    assert r.choices[0].finish_reason in ("length", "stop")
    assert re.fullmatch(r"a+b" if r.choices[0].finish_reason == "stop" else r"a+b?", text)
    r = client.completions.create(model="smollm2", prompt="x", max_tokens=12, temperature=0,
                                  extra_body={"grammar": 'root ::= "a"+'})
    assert r.choices[0].finish_reason == "length" and r.choices[0].text == "a" * 12
