"""Tool calling syntaxes (pyllm.chat.tools, pyllm.chat.tool_stream): request checks, prompts
through real chat templates and built-in formats, llguidance grammars on real vocabularies,
whole-reply parsing and stream parsing.

Vocabularies: SmolLM2's (the model file; ChatML family) for Hermes and generic JSON; llama.cpp's
Llama 3 vocabulary with the three token names Llama 3.1 changed (``<|finetune_right_pad_id|>``,
``<|eom_id|>``, ``<|python_tag|>`` at 128004/128008/128010; 3.0 has reserved tokens there, the
rest is identical) for Llama 3; llama.cpp's Llama 2 SentencePiece vocabulary plus Mistral's
tool control tokens (the makeup of Mistral's v0.3 vocabulary; the ids differ) for Mistral.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from pyllm.chat import list_formats, render
from pyllm.chat.tool_stream import mistral_id
from pyllm.chat.tools import (
    GENERIC,
    HERMES,
    LLAMA3,
    MISTRAL,
    CallDelta,
    ContentDelta,
    ToolCall,
    ToolChoice,
    ToolSyntax,
    check_tool_choice,
    check_tools,
    detect_syntax,
    prepare_messages,
    special_markers,
    template_handles_tools,
)
from pyllm.errors import ToolCallError
from pyllm.formats.gguf import GGUFReader
from pyllm.runtime.grammar import Constraint, Grammar
from pyllm.tokenizer import Tokenizer
from pyllm.tokenizer.vocab import TokenType
from tests.test_chat_hf_parity import (
    LLAMA_3_1_INSTRUCT,
    LLAMA_3_2_INSTRUCT,
    MISTRAL_V0_2_INSTRUCT,
    MISTRAL_V0_3_INSTRUCT,
    QWEN_2_5_INSTRUCT,
    TOOL_ROUND,
    WEATHER_TOOL,
)

ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a"],
        },
    },
}
TOOLS = [WEATHER_TOOL, ADD_TOOL]
ALL_SYNTAXES = (LLAMA3, HERMES, MISTRAL, GENERIC)
LLAMA_VARS = {"bos_token": "<|begin_of_text|>", "date_string": "26 Jul 2024"}
MISTRAL_VARS = {"bos_token": "<s>", "eos_token": "</s>"}

GW = ToolCall("call0W3a7", "get_weather", '{"city":"Zürich"}')
ADD = ToolCall("Z9y8X7w6V", "add", '{"a":1,"b":2}')


def openai_round(call_id: str = "call0W3a7") -> list[dict[str, Any]]:
    """TOOL_ROUND as an OpenAI client sends it: arguments as JSON text."""
    msgs = copy.deepcopy(TOOL_ROUND)
    call = msgs[1]["tool_calls"][0]
    call["id"] = call_id
    call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    msgs[2]["tool_call_id"] = call_id
    return msgs


# ---- vocabularies ---------------------------------------------------------------------------

def _metadata(path: Path) -> dict[str, Any]:
    reader = GGUFReader(path)
    try:
        return {k: v for k, v in reader.metadata.items() if k.startswith("tokenizer.")}
    finally:
        reader.close()


def _with_tokens(md: dict[str, Any], extra: dict[str, TokenType]) -> Tokenizer:
    md = dict(md)
    md["tokenizer.ggml.tokens"] = list(md["tokenizer.ggml.tokens"]) + list(extra)
    md["tokenizer.ggml.token_type"] = list(md["tokenizer.ggml.token_type"]) + \
        [int(t) for t in extra.values()]
    if "tokenizer.ggml.scores" in md:
        md["tokenizer.ggml.scores"] = list(md["tokenizer.ggml.scores"]) + [0.0] * len(extra)
    return Tokenizer.from_metadata(md)


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def llama31(vocab_dir: Path) -> Tokenizer:
    md = _metadata(vocab_dir / "ggml-vocab-llama-bpe.gguf")
    tokens = list(md["tokenizer.ggml.tokens"])
    assert tokens[128010] == "<|reserved_special_token_5|>"  # the Llama 3.0 vocabulary
    tokens[128004], tokens[128008], tokens[128010] = \
        "<|finetune_right_pad_id|>", "<|eom_id|>", "<|python_tag|>"
    md["tokenizer.ggml.tokens"] = tokens
    return Tokenizer.from_metadata(md)


MISTRAL_CONTROLS = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                    "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")


@pytest.fixture(scope="module")
def mistral(vocab_dir: Path) -> Tokenizer:
    md = _metadata(vocab_dir / "ggml-vocab-llama-spm.gguf")
    return _with_tokens(md, dict.fromkeys(MISTRAL_CONTROLS, TokenType.CONTROL))


@pytest.fixture(scope="module")
def qwen_like(smollm2_path: Path) -> Tokenizer:
    """SmolLM2's vocabulary with Qwen's <tool_call> / </tool_call> user-defined tokens."""
    md = _metadata(smollm2_path)
    return _with_tokens(md, dict.fromkeys(("<tool_call>", "</tool_call>"),
                                          TokenType.USER_DEFINED))


# ---- check_tools / check_tool_choice ----------------------------------------------------------

def test_check_tools_normalises() -> None:
    bare = {"type": "function", "function": {"name": "ping", "strict": True, "extra": 1}}
    out = check_tools([WEATHER_TOOL, bare])
    assert out[0] == WEATHER_TOOL and out[0] is not WEATHER_TOOL
    assert out[1] == {"type": "function", "function": {
        "name": "ping", "parameters": {"type": "object", "properties": {}}, "strict": True}}
    assert check_tools(None) == []
    assert check_tools(out) == out  # idempotent


BAD_TOOLS = [
    ({"type": "function"}, "tools must be a list"),
    ("get_weather", "tools must be a list"),
    ([1], "tools[0] must be an object"),
    ([{"type": "fn", "function": {"name": "x"}}], "tools[0].type must be \"function\", got 'fn'"),
    ([{"type": "function"}], "tools[0].function must be an object"),
    ([{"type": "function", "function": {"name": "get weather"}}],
     "tools[0].function.name must be 1 to 64 letters"),
    ([{"type": "function", "function": {"name": "x" * 65}}], "tools[0].function.name"),
    ([{"type": "function", "function": {}}], "tools[0].function.name must be"),
    ([WEATHER_TOOL, WEATHER_TOOL],
     "tools[1].function.name 'get_weather' is already the name of tools[0]"),
    ([{"type": "function", "function": {"name": "x", "description": 3}}],
     "tools[0].function.description must be a string"),
    ([{"type": "function", "function": {"name": "x", "parameters": []}}],
     "tools[0].function.parameters must be a JSON schema object"),
    ([{"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}],
     "tools[0].function.parameters must describe an object"),
    ([{"type": "function", "function": {"name": "x", "parameters": {"maximum": float("nan")}}}],
     "tools[0].function.parameters is not JSON"),
    ([{"type": "function", "function": {"name": "x", "strict": "yes"}}],
     "tools[0].function.strict must be true or false"),
    ([{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)],
     "tools has 129 items; at most 128"),
]


@pytest.mark.parametrize(("tools", "message"), BAD_TOOLS, ids=[m for _, m in BAD_TOOLS])
def test_check_tools_refuses(tools: Any, message: str) -> None:
    with pytest.raises(ToolCallError) as e:
        check_tools(tools)
    assert message in str(e.value)


def test_check_tool_choice() -> None:
    assert check_tool_choice(None, TOOLS) == ToolChoice("auto")
    assert check_tool_choice(None, []) == ToolChoice("none")
    assert check_tool_choice("auto", None) == ToolChoice("none")  # nothing to call
    for mode in ("auto", "none", "required"):
        assert check_tool_choice(mode, TOOLS) == ToolChoice(mode)
    named = {"type": "function", "function": {"name": "add"}}
    assert check_tool_choice(named, TOOLS) == ToolChoice("required", "add")
    assert check_tool_choice(ToolChoice("required", "add"), TOOLS).forced


BAD_CHOICES = [
    ("any", TOOLS, "tool_choice must be \"auto\", \"none\", \"required\" or"),
    (3, TOOLS, "tool_choice must be a string or an object, not int"),
    ({"function": {"name": "add"}}, TOOLS, "tool_choice.type must be \"function\""),
    ({"type": "function"}, TOOLS, "tool_choice.function.name must name one of the tools"),
    ({"type": "function", "function": {"name": "mul"}}, TOOLS,
     "tool_choice names 'mul', which is not one of the tools (get_weather, add)"),
    ("required", [], 'tool_choice is "required" but the request has no tools'),
    ({"type": "function", "function": {"name": "add"}}, None,
     "tool_choice names 'add' but the request has no tools"),
    (ToolChoice("required", "mul"), TOOLS, "tool_choice names 'mul'"),
]


@pytest.mark.parametrize(("choice", "tools", "message"), BAD_CHOICES,
                         ids=[m for _, _, m in BAD_CHOICES])
def test_check_tool_choice_refuses(choice: Any, tools: Any, message: str) -> None:
    with pytest.raises(ToolCallError) as e:
        check_tool_choice(choice, tools)
    assert message in str(e.value)


def test_tool_choice_shape() -> None:
    with pytest.raises(ToolCallError, match="mode must be one of auto, none, required"):
        ToolChoice("sometimes")
    with pytest.raises(ToolCallError, match="a named tool choice is a required call"):
        ToolChoice("auto", "add")


def test_openai_shapes() -> None:
    assert GW.to_openai() == {"id": "call0W3a7", "type": "function",
                              "function": {"name": "get_weather", "arguments": '{"city":"Zürich"}'}}
    assert GW.to_openai(2)["index"] == 2
    assert CallDelta(1, "call_x", "add", "").to_openai() == {
        "index": 1, "id": "call_x", "type": "function",
        "function": {"name": "add", "arguments": ""}}
    assert CallDelta(1, None, None, '{"a"').to_openai() == {
        "index": 1, "function": {"arguments": '{"a"'}}


# ---- which syntax ---------------------------------------------------------------------------

def test_detect_syntax_from_templates(smollm2_path: Path) -> None:
    smollm2_template = _metadata(smollm2_path)["tokenizer.chat_template"]
    llama3_0 = ("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
                "{{ m.content }}<|eot_id|>{% endfor %}")
    assert detect_syntax(LLAMA_3_1_INSTRUCT) is LLAMA3
    assert detect_syntax(LLAMA_3_2_INSTRUCT) is LLAMA3
    assert detect_syntax(QWEN_2_5_INSTRUCT) is HERMES
    assert detect_syntax(MISTRAL_V0_3_INSTRUCT) is MISTRAL
    assert detect_syntax(MISTRAL_V0_2_INSTRUCT) is GENERIC
    assert detect_syntax(llama3_0) is GENERIC  # Llama 3.0: no tool calling
    assert detect_syntax(smollm2_template) is GENERIC
    assert detect_syntax(None) is GENERIC
    assert detect_syntax(smollm2_template, "chatml") is HERMES  # the template says nothing


def test_detect_syntax_of_every_format() -> None:
    expected = {"chatml": HERMES, "llama-3": LLAMA3, "mistral-instruct": MISTRAL}
    for name in list_formats():
        assert detect_syntax(None, name) is expected.get(name, GENERIC), name
    for alias, syntax in (("qwen", HERMES), ("smollm", HERMES), ("llama3", LLAMA3),
                          ("mistral", MISTRAL), ("llama2", GENERIC)):
        assert detect_syntax(None, alias) is syntax


def test_template_handles_tools(smollm2_path: Path) -> None:
    for template in (LLAMA_3_1_INSTRUCT, LLAMA_3_2_INSTRUCT, QWEN_2_5_INSTRUCT,
                     MISTRAL_V0_3_INSTRUCT, "{% if tools %}x{% endif %}{{ messages[0].content }}"):
        assert template_handles_tools(template)
    for template in (MISTRAL_V0_2_INSTRUCT, _metadata(smollm2_path)["tokenizer.chat_template"],
                     "{{ 'tools are great' }}{{ messages[0].content }}",  # only in a string
                     "{{ messages[0].tools }}", None, ""):
        assert not template_handles_tools(template)


# ---- prompts ----------------------------------------------------------------------------------

NATIVE = [(LLAMA3, LLAMA_3_1_INSTRUCT, LLAMA_VARS), (LLAMA3, LLAMA_3_2_INSTRUCT, LLAMA_VARS),
          (HERMES, QWEN_2_5_INSTRUCT, {}), (MISTRAL, MISTRAL_V0_3_INSTRUCT, MISTRAL_VARS)]


@pytest.mark.parametrize(("syntax", "template", "variables"), NATIVE,
                         ids=["llama-3.1", "llama-3.2", "qwen-2.5", "mistral-v0.3"])
def test_native_render_matches_the_template(syntax: ToolSyntax, template: str,
                                            variables: dict[str, Any]) -> None:
    """OpenAI-shaped history (arguments as JSON text) renders as the template renders the
    same history with dict arguments (what Hugging Face templates expect)."""
    msgs, tools = prepare_messages(openai_round(), [WEATHER_TOOL], syntax, native=True)
    assert tools == [WEATHER_TOOL]
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Zürich"}
    ours = render(msgs, template, tools=tools, **variables)
    assert ours == render(TOOL_ROUND, template, tools=[WEATHER_TOOL], **variables)
    expected = {
        "llama3": '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", '
                  '"parameters": {"city": "Zürich"}}<|eot_id|><|start_header_id|>ipython'
                  '<|end_header_id|>\n\n"{\\"temperature_c\\": 21, \\"sky\\": \\"clear '
                  '<sunny>\\"}"<|eot_id|>',
        "hermes": '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
                  '{"city": "Zürich"}}\n</tool_call><|im_end|>\n<|im_start|>user\n'
                  '<tool_response>\n{"temperature_c": 21, "sky": "clear <sunny>"}\n'
                  '</tool_response><|im_end|>\n',
        "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Zürich"}, '
                   '"id": "call0W3a7"}]</s>[TOOL_RESULTS] {"content": {"temperature_c": 21, '
                   '"sky": "clear <sunny>"}, "call_id": "call0W3a7"}[/TOOL_RESULTS]',
    }[syntax.name]
    assert expected in ours


def test_native_mistral_maps_ids_to_nine_characters() -> None:
    msgs, tools = prepare_messages(openai_round("call_8f3kQ2"), [WEATHER_TOOL], MISTRAL, True)
    mapped = mistral_id("call_8f3kQ2")
    assert re.fullmatch(r"[a-zA-Z0-9]{9}", mapped) and mapped == mistral_id("call_8f3kQ2")
    assert msgs[1]["tool_calls"][0]["id"] == mapped and msgs[2]["tool_call_id"] == mapped
    text = render(msgs, MISTRAL_V0_3_INSTRUCT, tools=tools, **MISTRAL_VARS)
    assert f'"id": "{mapped}"}}]</s>' in text and f'"call_id": "{mapped}"}}' in text
    # the id as sent is refused by the template itself: the mapping is what makes it render
    raw = [dict(m) for m in openai_round("call_8f3kQ2")]
    raw[1]["tool_calls"] = [{**raw[1]["tool_calls"][0], "function": {
        "name": "get_weather", "arguments": {"city": "Zürich"}}}]
    with pytest.raises(Exception, match="alphanumeric strings with length 9"):
        render(raw, MISTRAL_V0_3_INSTRUCT, tools=tools, **MISTRAL_VARS)


def _two_calls_and_results(with_ids: bool) -> list[dict[str, Any]]:
    calls = [c.to_openai() for c in (GW, ADD)]
    results = [{"role": "tool", "content": "sunny"}, {"role": "tool", "content": "3"}]
    if with_ids:
        results[0]["tool_call_id"], results[1]["tool_call_id"] = GW.id, ADD.id
    return [{"role": "user", "content": "Weather in Zürich, and 1+2?"},
            {"role": "assistant", "content": None, "tool_calls": calls}, *results]


def test_native_llama_takes_one_call_per_turn() -> None:
    msgs, tools = prepare_messages(_two_calls_and_results(True), TOOLS, LLAMA3, True)
    assert [m["role"] for m in msgs] == ["user", "assistant", "assistant", "tool", "tool"]
    text = render(msgs, LLAMA_3_1_INSTRUCT, tools=tools, **LLAMA_VARS)
    assert ('{"name": "get_weather", "parameters": {"city": "Zürich"}}<|eot_id|>'
            '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "add", "parameters": '
            '{"a": 1, "b": 2}}<|eot_id|>') in text


def test_hermes_text_history_is_what_qwen_renders() -> None:
    """Calls and results written as text through the plain ChatML format give exactly Qwen's
    native rendering of them (results without ids answer the calls in order)."""
    native, tools = prepare_messages(_two_calls_and_results(True), TOOLS, HERMES, True)
    qwen = render(native, QWEN_2_5_INSTRUCT, tools=tools)
    plain, none = prepare_messages(_two_calls_and_results(False), TOOLS, HERMES, False)
    assert none is None
    chatml = render(plain, "chatml")
    start = "<|im_start|>assistant\n<tool_call>"
    assert chatml[chatml.index(start):] == qwen[qwen.index(start):]
    assert ('<tool_response>\nsunny\n</tool_response>\n<tool_response>\n3\n</tool_response>'
            '<|im_end|>\n<|im_start|>assistant\n') in chatml


@pytest.mark.parametrize("syntax", ALL_SYNTAXES, ids=lambda s: s.name)
def test_text_history_parts(syntax: ToolSyntax) -> None:
    fmt = {"llama3": "llama-3", "hermes": "chatml", "mistral": "mistral-instruct",
           "generic": "vicuna"}[syntax.name]
    msgs, tools = prepare_messages(openai_round(), [WEATHER_TOOL], syntax, native=False)
    assert tools is None
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    prompt = syntax.system_prompt([WEATHER_TOOL])
    assert msgs[0]["content"] == prompt
    both = syntax.system_prompt(TOOLS)
    for tool in TOOLS:  # each tool's name and schema, as this family lists them
        schema = {"llama3": json.dumps(tool, ensure_ascii=False, indent=4),
                  "hermes": json.dumps(tool, ensure_ascii=False),
                  "mistral": json.dumps(tool, ensure_ascii=False),
                  "generic": json.dumps(tool["function"]["parameters"], ensure_ascii=False),
                  }[syntax.name]
        assert tool["function"]["name"] in both and schema in both
    assert "add" not in prompt
    call, result = {
        "llama3": ('{"name": "get_weather", "parameters": {"city": "Zürich"}}',
                   '{"tool_response": {"name": "get_weather", "id": "call0W3a7", "content": '
                   '{"temperature_c": 21, "sky": "clear <sunny>"}}}'),
        "hermes": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n'
                   '</tool_call>',
                   '<tool_response>\n{"temperature_c": 21, "sky": "clear <sunny>"}\n'
                   '</tool_response>'),
        "mistral": ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Zürich"}, '
                    '"id": "call0W3a7"}]',
                    '[TOOL_RESULTS]{"content": {"temperature_c": 21, "sky": "clear <sunny>"}, '
                    '"call_id": "call0W3a7"}[/TOOL_RESULTS]'),
        "generic": ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Zürich"}}]}',
                    '{"tool_response": {"name": "get_weather", "id": "call0W3a7", "content": '
                    '{"temperature_c": 21, "sky": "clear <sunny>"}}}'),
    }[syntax.name]
    assert msgs[2]["content"] == call and msgs[3]["content"] == result
    text = render(msgs, fmt)
    assert prompt.strip() in text and call in text and result in text
    # a system message of the caller comes first, the tools after it
    with_system = [{"role": "system", "content": "Be brief."}, *openai_round()]
    msgs, _ = prepare_messages(with_system, [WEATHER_TOOL], syntax, native=False)
    assert msgs[0]["content"] == "Be brief.\n\n" + prompt and len(msgs) == 4


def test_text_history_through_smollm2_template(smollm2_path: Path) -> None:
    template = _metadata(smollm2_path)["tokenizer.chat_template"]
    msgs, _ = prepare_messages(_two_calls_and_results(False) + [
        {"role": "user", "content": "Thanks. And Bern?"}], TOOLS, GENERIC, False)
    text = render(msgs, template)
    assert text.startswith("<|im_start|>system\nYou can call these tools:\n- get_weather: ")
    assert ('<|im_start|>assistant\n{"tool_calls": [{"name": "get_weather", "arguments": '
            '{"city": "Zürich"}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]}<|im_end|>\n'
            '<|im_start|>user\n{"tool_response": {"name": "get_weather", "id": "call0W3a7", '
            '"content": "sunny"}}\n{"tool_response": {"name": "add", "id": "Z9y8X7w6V", '
            '"content": 3}}\n\nThanks. And Bern?<|im_end|>\n<|im_start|>assistant\n') in text


@pytest.mark.parametrize("syntax", ALL_SYNTAXES, ids=lambda s: s.name)
def test_rendered_calls_parse_back(syntax: ToolSyntax) -> None:
    content, calls = syntax.parse(syntax.render_turn("Let me check.", [GW, ADD]))
    assert [(c.name, json.loads(c.arguments)) for c in calls] == \
        [("get_weather", {"city": "Zürich"}), ("add", {"a": 1, "b": 2})]
    # the generic reply is one JSON object: a turn with calls carries only the calls
    assert content == (None if syntax is GENERIC else "Let me check.")
    if syntax is MISTRAL:
        assert [c.id for c in calls] == [GW.id, ADD.id]


BAD_HISTORY = [
    ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0] has tool_calls but role"),
    ([{"role": "assistant", "content": None, "tool_calls": {"id": "x"}}],
     "messages[0].tool_calls must be a list"),
    ([{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": '{"a": '}}]}],
     "messages[0].tool_calls[0].function.arguments is not JSON"),
    ([{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": "[1]"}}]}],
     "messages[0].tool_calls[0].function.arguments must be a JSON object"),
    ([{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"arguments": "{}"}}]}],
     "messages[0].tool_calls[0].function.name must be a tool name"),
    ([{"role": "tool", "content": 5}], "messages[0] (a tool result) content must be text"),
    ([{"role": "tool", "content": "x", "tool_call_id": 7}], "messages[0].tool_call_id must be"),
    ("hello", "messages must be a list"),
    ([3], "messages[0] must be an object"),
]


@pytest.mark.parametrize(("messages", "message"), BAD_HISTORY, ids=[m for _, m in BAD_HISTORY])
def test_prepare_messages_refuses(messages: Any, message: str) -> None:
    for native in (True, False):
        with pytest.raises(ToolCallError) as e:
            prepare_messages(messages, TOOLS, HERMES, native)
        assert message in str(e.value)


def test_tool_result_parts_are_joined() -> None:
    msgs, _ = prepare_messages(
        [{"role": "user", "content": "q"},
         {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "a"},
                                                          {"type": "text", "text": "b"}]}],
        TOOLS, HERMES, True)
    assert msgs[1] == {"role": "tool", "tool_call_id": "c1", "content": "ab"}


# ---- parsing whole replies ----------------------------------------------------------------------

W = {"city": "Zürich"}
# (reply, content, [(name, arguments)]); a content of ... means "the whole reply, no calls"
PARSE_CASES: dict[str, list[tuple[str, Any, list[tuple[str, Any]]]]] = {
    "hermes": [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>',
         None, [("get_weather", W)]),
        ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n'
         '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
         "\n", "Let me check.", [("get_weather", W), ("add", {"a": 1, "b": 2})]),
        ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n', None, [("add", {"a": 1})]),
        ('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>', None,
         [("add", {"a": 1})]),
        ('A <tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call> B '
         '<tool_call>{"name": 5}</tool_call> C\n',
         'A  B <tool_call>{"name": 5}</tool_call> C', [("add", {"a": 1})]),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zü', ..., []),  # truncated
        ('<tool_cal>\n{"name": "add", "arguments": {"a": 1}}\n</tool_cal>', ..., []),  # marker
        ('<tool_call>\n{"name": "add", "arguments": [1, 2]}\n</tool_call>', ..., []),  # type
        ('<tool_call>\n{"name": "add two", "arguments": {}}\n</tool_call>', ..., []),  # name
        ('<tool_call>\n{"name": "add"}\n</tool_call>', ..., []),  # no arguments
        ("1 < 2 and <b>bold</b> <tool", ..., []),
        ("  \n", None, []),
    ],
    "llama3": [
        ('{"name": "get_weather", "parameters": {"city": "Zürich"}}', None,
         [("get_weather", W)]),
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Zürich"}}; '
         '{"name": "add", "arguments": {"a": 1, "b": 2}}', None,
         [("get_weather", W), ("add", {"a": 1, "b": 2})]),
        ('Checking now.<|python_tag|>{"name": "add", "parameters": {"a": 1}}', "Checking now.",
         [("add", {"a": 1})]),
        ('  {"name": "add", "parameters": {"a": 1}}  \n', None, [("add", {"a": 1})]),
        ('{"name": "add", "parameters": {"a": 1}}<|python_tag|>{"name": "add", "parameters": '
         '{"a": 2}}', '{"name": "add", "parameters": {"a": 1}}', [("add", {"a": 2})]),
        ('<|python_tag|>{"name": "add", "parameters": {"a": ', ..., []),  # truncated
        ('{"name": "add", "parameters": {"a": 1}} is what I would call', ..., []),
        ('{"parameters": {"a": 1}, "name": "add"}', ..., []),  # a call starts with its name
        ('{"answer": 42}', ..., []),
        ('{"name": "add", "parameters": [1]}', ..., []),  # type
        ('The call is {"name": "add", "parameters": {}}', ..., []),
        ('<|python_start|>{"name": "add", "parameters": {}}', ..., []),  # marker
        ('<|python_tag|>{"name": "add", "parameters": {}};', ..., []),
    ],
    "mistral": [
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Zürich"}, '
         '"id": "a1B2c3D4e"}]', None, [("get_weather", W)]),
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Zürich"}, "id": '
         '"a1B2c3D4e"}, {"name": "add", "arguments": {"a": 1}, "id": "Z9y8X7w6V"}]', None,
         [("get_weather", W), ("add", {"a": 1})]),
        ('Sure.[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}]', "Sure.",
         [("add", {"a": 1})]),
        ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}, "id": "call_1"}]', None,
         [("add", {"a": 1})]),
        ('[TOOL_CALLS] {"name": "add", "arguments": {"a": 1}}', None, [("add", {"a": 1})]),
        ('[TOOL_CALLS] [{"name": "add", "argu', ..., []),  # truncated
        ('[TOOL_CALL] [{"name": "add", "arguments": {"a": 1}}]', ..., []),  # marker
        ('[TOOL_CALLS] "add"', ..., []),  # type
        ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}] and more', ..., []),
        ("[TOOL_CALLS] []", ..., []),
    ],
    "generic": [
        ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Zürich"}}]}', None,
         [("get_weather", W)]),
        ('\n {"tool_calls": [{"name": "add", "arguments": {"a": 1}}, {"name": "add", '
         '"arguments": {"a": 2}}]} \n', None, [("add", {"a": 1}), ("add", {"a": 2})]),
        ('{"response": "Sunny in Zürich.\\nLine \\"two\\" \\u00e9\\ud83d\\ude00\\ttab."}',
         'Sunny in Zürich.\nLine "two" é\U0001f600\ttab.', []),
        ('  { "response" : "Hi"  }\n', "Hi", []),
        ('{"response": "Hello, wor', "Hello, wor", []),  # cut off: what was written
        ('{"response": "caf\\u00', "caf\\u00", []),
        ('{"response": "a\\ud83d b\\qc"}', "a\ufffd b\\qc", []),
        ('{"response": "Hi", "x": 1}', 'Hi, "x": 1}', []),
        ("Sure, here it is.", ..., []),
        ('{"tool_calls": []}', ..., []),
        ('{"tool_calls": [{"name": "add", "arguments": {"a": 1}}], "note": 1}', ..., []),
        ('{"tool_calls": [{"name": "add", "argu', ..., []),  # truncated
        ('{"response": 5}', ..., []),
        ('{"answer": "x"}', ..., []),
    ],
}
SYNTAX_BY_NAME = {s.name: s for s in ALL_SYNTAXES}
ALL_REPLIES = [(SYNTAX_BY_NAME[name], case) for name, cases in PARSE_CASES.items()
               for case in cases]
REPLY_IDS = [f"{s.name}-{i}" for i, (s, _) in enumerate(ALL_REPLIES)]


@pytest.mark.parametrize(("syntax", "case"), ALL_REPLIES, ids=REPLY_IDS)
def test_parse(syntax: ToolSyntax, case: tuple[str, Any, list[tuple[str, Any]]]) -> None:
    text, content, expected = case
    got_content, calls = syntax.parse(text)
    assert got_content == (text.rstrip() if content is ... else content)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == expected
    for c in calls:
        assert c.arguments == json.dumps(json.loads(c.arguments), ensure_ascii=False,
                                         separators=(",", ":"))
        shape = r"[a-zA-Z0-9]{9}" if syntax is MISTRAL else r"call_[a-zA-Z0-9]{24}"
        assert re.fullmatch(shape, c.id)
    assert len({c.id for c in calls}) == len(calls)


def test_mistral_keeps_the_model_ids() -> None:
    _, calls = MISTRAL.parse(PARSE_CASES["mistral"][1][0])
    assert [c.id for c in calls] == ["a1B2c3D4e", "Z9y8X7w6V"]
    _, calls = MISTRAL.parse(PARSE_CASES["mistral"][3][0])  # "call_1": not Mistral's shape
    assert calls[0].id != "call_1"


# ---- grammars -----------------------------------------------------------------------------------

def run_grammar(grammar: str, tok: Tokenizer, text: str,
                parse_special: bool = True) -> tuple[bool, bool]:
    """(every token of ``text`` was allowed by the mask, the grammar is complete after it)."""
    constraint = Constraint(Grammar.lark(grammar), tok, tok.n_vocab, prefetch=False)
    for t in tok.encode(text, add_special=False, parse_special=parse_special):
        if not (int(constraint.mask()[t >> 5]) >> (t & 31)) & 1:
            return False, False
        constraint.accept(t)
    return True, constraint.finished or constraint.accepting


def _tokenizer(syntax: ToolSyntax, request: pytest.FixtureRequest) -> Tokenizer:
    name = {"llama3": "llama31", "hermes": "smollm2", "generic": "smollm2",
            "mistral": "mistral"}[syntax.name]
    tok: Tokenizer = request.getfixturevalue(name)
    return tok


BAD_WEATHER = ToolCall("call0W3a7", "get_weather", '{"city":5}')
NO_CITY = ToolCall("call0W3a7", "get_weather", "{}")
UNKNOWN = ToolCall("call0W3a7", "delete_all", "{}")
REQUIRED, NAMED = ToolChoice("required"), ToolChoice("required", "add")


@pytest.mark.parametrize("syntax", ALL_SYNTAXES, ids=lambda s: s.name)
def test_forced_grammar(syntax: ToolSyntax, request: pytest.FixtureRequest) -> None:
    tok = _tokenizer(syntax, request)
    specials = special_markers(tok)
    required = syntax.grammar(TOOLS, REQUIRED, False, specials)
    named = syntax.grammar(TOOLS, NAMED, True, specials)  # named: one call, even if parallel
    parallel = syntax.grammar(TOOLS, REQUIRED, True, specials)
    assert required and named and parallel
    for g in (required, named, parallel):
        Grammar.lark(g).compiled()
    one, add, two = (syntax.render_calls(c) for c in ([GW], [ADD], [GW, ADD]))
    for grammar, calls in ((required, [GW]), (required, [ADD]), (named, [ADD]),
                           (parallel, [GW]), (parallel, [GW, ADD])):
        text = syntax.render_calls(calls)
        assert run_grammar(grammar, tok, text) == (True, True), text
        parsed = syntax.parse(text)[1]
        assert [(c.name, c.arguments) for c in parsed] == [(c.name, c.arguments) for c in calls]
    # negative controls: each is refused before its end
    for grammar, text in ((required, syntax.render_calls([BAD_WEATHER])),
                          (required, syntax.render_calls([NO_CITY])),
                          (required, syntax.render_calls([UNKNOWN])),
                          (named, one),
                          (required, two),
                          (named, syntax.render_calls([ADD, ADD])),
                          (parallel, "Sure! " + one)):
        assert run_grammar(grammar, tok, text) == (False, False), text


def test_llama_grammar_allows_the_python_tag(llama31: Tokenizer) -> None:
    specials = special_markers(llama31)
    assert specials == {"<|python_tag|>": 128010}
    by_id = LLAMA3.grammar(TOOLS, REQUIRED, False, specials)
    by_text = LLAMA3.grammar(TOOLS, REQUIRED, False, list(specials))
    assert by_id is not None and by_id.startswith("start: <[128010]>? call\n")
    assert by_text is not None and by_text.startswith("start: <|python_tag|>? call\n")
    text = "<|python_tag|>" + LLAMA3.render_calls([GW])
    assert llama31.encode(text, add_special=False, parse_special=True)[0] == 128010
    for grammar in (by_id, by_text):
        assert run_grammar(grammar, llama31, text) == (True, True)
        # the tag spelled out as plain text is not the tag: refused
        assert run_grammar(grammar, llama31, text, parse_special=False) == (False, False)
    # without the token in the vocabulary the grammar does not mention it
    assert "python_tag" not in (LLAMA3.grammar(TOOLS, REQUIRED, False, {}) or "")


def test_mistral_grammar_references_the_control_token(mistral: Tokenizer) -> None:
    specials = special_markers(mistral)
    assert specials == {"[TOOL_CALLS]": mistral.token_to_id("[TOOL_CALLS]")}
    grammar = MISTRAL.grammar(TOOLS, REQUIRED, False, specials)
    assert grammar is not None
    assert grammar.startswith(f'start: <[{specials["[TOOL_CALLS]"]}]> " "? "[" call "]"\n')
    text = MISTRAL.render_calls([GW])
    assert run_grammar(grammar, mistral, text) == (True, True)
    # spelled out as text, the marker is not the control token: refused
    assert run_grammar(grammar, mistral, text, parse_special=False) == (False, False)
    # the id must be 9 letters or digits
    bad_id = MISTRAL.render_calls([GW]).replace('"call0W3a7"', '"call0W3a"')
    assert run_grammar(grammar, mistral, bad_id) == (False, False)
    with pytest.raises(ToolCallError, match="reference it by id"):
        MISTRAL.grammar(TOOLS, REQUIRED, False, {"[TOOL_CALLS]"})


def test_grammar_on_a_dummy_prefix_vocabulary(mistral: Tokenizer) -> None:
    # forced text in the middle of an output is tokenized without SentencePiece's dummy-prefix
    # space (Tokenizer.encode_continuation); with it, the "▁[" after [TOOL_CALLS] was refused
    grammar = MISTRAL.grammar(TOOLS, REQUIRED, False, special_markers(mistral))
    assert grammar is not None
    assert run_grammar(grammar, mistral, MISTRAL.render_calls([GW])) == (True, True)


def test_hermes_grammar_with_tool_call_tokens(qwen_like: Tokenizer) -> None:
    specials = special_markers(qwen_like)
    assert specials == {"<tool_call>": 49152, "</tool_call>": 49153}
    grammar = HERMES.grammar([WEATHER_TOOL], REQUIRED, False, list(specials))
    assert grammar == (
        'start: block\nblock: <tool_call> "\\n" call "\\n" </tool_call>\ncall: call0\n'
        'call0: "{\\"name\\": \\"get_weather\\", \\"arguments\\": " args0 "}"\n'
        'args0: %json {"type": "object", "properties": {"city": {"type": "string", '
        '"description": "City name, e.g. Zürich"}}, "required": ["city"], '
        '"additionalProperties": false, "x-guidance": '
        '{"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}}\n')
    text = HERMES.render_calls([GW])
    assert qwen_like.encode(text, add_special=False)[0] == 49152
    assert run_grammar(grammar, qwen_like, text) == (True, True)


def test_generic_grammar_in_auto_mode(smollm2: Tokenizer) -> None:
    auto = GENERIC.grammar(TOOLS, ToolChoice("auto"), False, ())
    assert auto is not None
    assert run_grammar(auto, smollm2, '{"response": "It is \\"sunny\\".\\n"}') == (True, True)
    assert run_grammar(auto, smollm2, GENERIC.render_calls([GW])) == (True, True)
    assert run_grammar(auto, smollm2, "It is sunny.") == (False, False)
    assert run_grammar(auto, smollm2, '{"answer": "sunny"}') == (False, False)
    required = GENERIC.grammar(TOOLS, REQUIRED, False, ())
    assert required is not None
    assert run_grammar(required, smollm2, '{"response": "Hi"}') == (False, False)


def test_free_replies_have_no_grammar() -> None:
    for syntax in ALL_SYNTAXES:
        assert syntax.grammar(TOOLS, ToolChoice("none"), True, ()) is None
        assert syntax.grammar([], ToolChoice("auto"), True, ()) is None
        if syntax is not GENERIC:
            assert syntax.grammar(TOOLS, ToolChoice("auto"), True, ()) is None


def test_special_markers(vocab_dir: Path, smollm2: Tokenizer, llama31: Tokenizer) -> None:
    assert special_markers(llama31) == {"<|python_tag|>": 128010}
    assert special_markers(smollm2) == {}
    # Llama 3.0 has a reserved token where 3.1 has <|python_tag|>
    assert special_markers(Tokenizer.from_gguf(vocab_dir / "ggml-vocab-llama-bpe.gguf")) == {}


# ---- streaming ----------------------------------------------------------------------------------

def stream(syntax: ToolSyntax, pieces: list[str]) -> tuple[str | None, list[tuple[str, str, str]]]:
    """Feed ``pieces``, finish; (content, [(id, name, arguments)]) reassembled from the deltas."""
    parser = syntax.stream_parser()
    deltas = [d for piece in pieces for d in parser.feed(piece)] + parser.finish()
    assert parser.finish() == []
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    calls: dict[int, list[str]] = {}
    for d in deltas:
        if isinstance(d, ContentDelta):
            assert d.text
        elif d.index not in calls:
            assert d.index == len(calls) and d.id and d.name
            calls[d.index] = [d.id, d.name, d.arguments]
        else:
            assert d.id is None and d.name is None
            calls[d.index][2] += d.arguments
    return content or None, [(c[0], c[1], c[2]) for c in calls.values()]


def assert_stream_matches_parse(syntax: ToolSyntax, pieces: list[str]) -> None:
    text = "".join(pieces)
    content, calls = syntax.parse(text)
    got_content, got_calls = stream(syntax, pieces)
    assert got_content == content, pieces
    assert [(n, a) for _, n, a in got_calls] == [(c.name, c.arguments) for c in calls], pieces
    if syntax is MISTRAL:  # ids the model wrote are kept by both
        kept = [c.id for c in calls if c.id in text]
        assert [i for i, _, _ in got_calls if i in text] == kept


@pytest.mark.parametrize(("syntax", "case"), ALL_REPLIES, ids=REPLY_IDS)
def test_stream_in_pieces_of_every_size(syntax: ToolSyntax, case: tuple[str, Any, Any]) -> None:
    text = case[0]
    for size in range(1, len(text) + 1):
        assert_stream_matches_parse(syntax, [text[i:i + size]
                                             for i in range(0, len(text), size)])


@pytest.mark.parametrize("syntax", ALL_SYNTAXES, ids=lambda s: s.name)
def test_stream_token_by_token(syntax: ToolSyntax, request: pytest.FixtureRequest) -> None:
    """Pieces as a model emits them: one decoded token at a time, markers as their text."""
    tok = _tokenizer(syntax, request)
    for text, _, _ in PARSE_CASES[syntax.name]:
        decoder = tok.decoder(skip_special=False)
        ids = tok.encode(text, add_special=False, parse_special=True)
        pieces = [decoder.feed(t) for t in ids] + [decoder.flush()]
        assert_stream_matches_parse(syntax, pieces)


def _feed_all(syntax: ToolSyntax, pieces: list[str]) -> list[list[Any]]:
    parser = syntax.stream_parser()
    return [parser.feed(p) for p in pieces] + [parser.finish()]


def test_hermes_stream_order() -> None:
    block = '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    out = _feed_all(HERMES, ["Let me check. ", "<tool", block[5:-3], block[-3:], "\n"])
    assert out[0] == [ContentDelta("Let me check.")]  # content streams, its trailing space held
    assert out[1] == [] and out[2] == []  # the marker is held back, not leaked
    (call,) = out[3]
    assert isinstance(call, CallDelta) and (call.index, call.name, call.arguments) == \
        (0, "add", '{"a":1}')
    assert out[4] == [] and out[5] == []
    # a "<" that does not become the marker is released as soon as that is clear
    assert _feed_all(HERMES, ["x <tool", "s>"]) == [[ContentDelta("x")], [ContentDelta(" <tools>")],
                                                    []]


def test_llama_stream_order() -> None:
    out = _feed_all(LLAMA3, ['{"name"', ': "add", "parameters": {"a": 1}}'])
    assert out[0] == [] and out[1] == []
    assert [(d.name, d.arguments) for d in out[2] if isinstance(d, CallDelta)] == \
        [("add", '{"a":1}')]
    # JSON that cannot be a call is content at once
    assert _feed_all(LLAMA3, ['{"answer"', ": 42}"]) == [
        [ContentDelta('{"answer"')], [ContentDelta(": 42}")], []]
    # a tagless call followed by the tag is content: released when the tag arrives
    bare = '{"name": "add", "parameters": {}}'
    out = _feed_all(LLAMA3, [bare, "<|python_tag|>", bare])
    assert out[0] == [] and out[1] == [ContentDelta(bare)] and out[2] == []
    assert [d.name for d in out[3] if isinstance(d, CallDelta)] == ["add"]
    out = _feed_all(LLAMA3, ["Checking.", "<|python", '_tag|>{"name": "add", "parameters": {}}'])
    assert out[0] == [ContentDelta("Checking.")] and out[1] == [] and out[2] == []
    assert [d.name for d in out[3] if isinstance(d, CallDelta)] == ["add"]


def test_mistral_stream_order() -> None:
    out = _feed_all(MISTRAL, ["Sure.", "[TOOL_", 'CALLS] [{"name": "add", "arguments": {"a": 1}, ',
                              '"id": "a1B2c3D4e"}]'])
    assert out[0] == [ContentDelta("Sure.")] and out[1] == out[2] == out[3] == []
    assert out[4] == [CallDelta(0, "a1B2c3D4e", "add", '{"a":1}')]


def test_generic_stream_streams_the_response_text() -> None:
    out = _feed_all(GENERIC, [' {"resp', 'onse": "Hel', 'lo\\', 'n wor', 'ld \\ud83d',
                              '\\ude00"', "}"])
    assert out == [[], [ContentDelta("Hel")], [ContentDelta("lo")], [ContentDelta("\n wor")],
                   [ContentDelta("ld")], [ContentDelta(" \U0001f600")], [], []]
    out = _feed_all(GENERIC, ['{"tool_calls": [{"name": "add", ', '"arguments": {"a": 1}}]}'])
    assert out[0] == out[1] == []
    assert [(d.index, d.name, d.arguments) for d in out[2] if isinstance(d, CallDelta)] == \
        [(0, "add", '{"a":1}')]


def test_stream_parser_misuse() -> None:
    parser = HERMES.stream_parser()
    with pytest.raises(ToolCallError, match="feed\\(\\) takes text"):
        parser.feed(b"x")  # type: ignore[arg-type]
    parser.finish()
    with pytest.raises(ToolCallError, match="feed\\(\\) after finish\\(\\)"):
        parser.feed("x")


def test_parse_takes_text() -> None:
    with pytest.raises(ToolCallError, match="parse\\(\\) takes the reply's text, not bytes"):
        HERMES.parse(b"<tool_call>")  # type: ignore[arg-type]


def test_text_history_takes_content_parts() -> None:
    msgs, _ = prepare_messages(
        [{"role": "user", "content": "q"},
         {"role": "assistant", "content": [{"type": "text", "text": "Let me "},
                                           {"type": "text", "text": "check."}],
          "tool_calls": [GW.to_openai()]}], TOOLS, HERMES, False)
    assert msgs[2]["content"] == HERMES.render_turn("Let me check.", [GW])
    assert msgs[2]["content"].startswith("Let me check.\n<tool_call>\n")
    with pytest.raises(ToolCallError, match=r"messages\[1\] \(assistant\) content must be text"):
        prepare_messages([{"role": "user", "content": "q"},
                          {"role": "assistant", "content": 5, "tool_calls": [GW.to_openai()]}],
                         TOOLS, HERMES, False)
