"""Tool calling (OpenAI ``tools`` / ``tool_choice``) in the syntaxes chat models are trained on.

This module owns what each model family writes when it calls a function, and everything built
from that: checking a request's ``tools`` and ``tool_choice``, preparing a conversation with tool
calls and results for a template that renders tools itself (native) or for any other template or
built-in format (the tools described in the system message, calls and results written as text),
the llguidance grammar of a forced call, and reading calls back out of a whole reply.
:mod:`pyllm.chat.tool_stream` reads them out of a streamed one.

The families (:data:`SYNTAXES`):

- ``LLAMA3`` (Llama 3.1 / 3.2 / 3.3): ``{"name": "fn", "parameters": {...}}``, optionally after
  the ``<|python_tag|>`` control token; several calls separated by ``;``.
- ``HERMES`` (Hermes 2 Pro, Qwen 2.5, Qwen 3): ``<tool_call>\\n{"name": "fn", "arguments":
  {...}}\\n</tool_call>`` blocks, content allowed before them.
- ``MISTRAL`` (v0.3 tokenizer): ``[TOOL_CALLS][{"name": "fn", "arguments": {...}, "id":
  "a1b2c3d4e"}]``; ids are 9 letters and digits.
- ``GENERIC`` (any other model): the whole reply is JSON, ``{"tool_calls": [...]}`` or
  ``{"response": "text"}``; its grammar applies to every reply, not only forced calls.

Markers that are control tokens (``<|python_tag|>``, ``[TOOL_CALLS]``) must reach the parsers
as their text: the caller decodes the reply with special tokens rendered.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2

from pyllm.chat.tool_stream import (
    NAME_RE,
    PYTHON_TAG,
    RESPONSE_OPENING,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_CALLS,
    TOOL_CALLS_OPENING,
    CallDelta,
    ContentDelta,
    Delta,
    GenericStream,
    HermesStream,
    LlamaStream,
    MistralStream,
    Opening,
    Parsed,
    ToolCall,
    ToolStreamParser,
    compact,
    decode_string,
    generic_calls,
    hermes_block,
    llama_calls,
    loads,
    make_calls,
    match_opening,
    mistral_calls,
    mistral_id,
)
from pyllm.errors import ToolCallError

MAX_TOOLS = 128  # OpenAI's own limit; a longer list is most likely a mistake
DEFAULT_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
MODES = ("auto", "none", "required")
TOOL_RESULT_ROLES = ("tool", "ipython")


# ---- the request ------------------------------------------------------------------------------

def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI ``tools`` checked and copied: ``[{"type": "function", "function": {"name",
    "description"?, "parameters", "strict"?}}]`` (``parameters`` defaults to an empty object
    schema). ``None`` gives ``[]``. ToolCallError names the item and field at fault."""
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ToolCallError('tools must be a list of {"type": "function", "function": {...}} '
                            f"objects, not {type(tools).__name__}")
    if len(tools) > MAX_TOOLS:
        raise ToolCallError(f"tools has {len(tools)} items; at most {MAX_TOOLS} are allowed")
    out: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise ToolCallError(f"{where} must be an object, not {type(tool).__name__}")
        if tool.get("type") != "function":
            raise ToolCallError(f'{where}.type must be "function", got {tool.get("type")!r}')
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise ToolCallError(f"{where}.function must be an object with a name, "
                                f"not {type(fn).__name__}")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ToolCallError(f"{where}.function.name must be 1 to 64 letters, digits, '_' "
                                f"or '-', got {name!r}")
        if name in seen:
            raise ToolCallError(f"{where}.function.name {name!r} is already the name of "
                                f"tools[{seen[name]}]")
        seen[name] = i
        entry: dict[str, Any] = {"name": name}
        description = fn.get("description")
        if description is not None:
            if not isinstance(description, str):
                raise ToolCallError(f"{where}.function.description must be a string, "
                                    f"not {type(description).__name__}")
            entry["description"] = description
        entry["parameters"] = _check_parameters(fn.get("parameters"), where)
        strict = fn.get("strict")
        if strict is not None:
            if not isinstance(strict, bool):
                raise ToolCallError(f"{where}.function.strict must be true or false, "
                                    f"got {strict!r}")
            entry["strict"] = strict
        out.append({"type": "function", "function": entry})
    return out


def _check_parameters(params: Any, where: str) -> dict[str, Any]:
    if params is None:
        return json.loads(json.dumps(DEFAULT_PARAMETERS))
    if not isinstance(params, Mapping):
        raise ToolCallError(f"{where}.function.parameters must be a JSON schema object, "
                            f"not {type(params).__name__}")
    if "type" in params and params["type"] != "object":
        raise ToolCallError(f'{where}.function.parameters must describe an object ("type": '
                            f'"object"): arguments are a JSON object; got {params["type"]!r}')
    try:  # a plain-JSON deep copy: what reaches templates and grammars is what was checked
        copy: dict[str, Any] = json.loads(json.dumps(params, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ToolCallError(f"{where}.function.parameters is not JSON: {e}") from None
    return copy


@dataclass(frozen=True)
class ToolChoice:
    """``mode`` is "auto", "none" or "required"; ``name`` (with "required") forces one tool."""

    mode: str = "auto"
    name: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ToolCallError(f"tool choice mode must be one of {', '.join(MODES)}, "
                                f"got {self.mode!r}")
        if self.name is not None and self.mode != "required":
            raise ToolCallError("a named tool choice is a required call (mode 'required')")

    @property
    def forced(self) -> bool:
        """The reply must be a call."""
        return self.mode == "required"


def check_tool_choice(choice: Any, tools: Any) -> ToolChoice:
    """OpenAI ``tool_choice`` against the request's tools: "auto", "none", "required" or
    ``{"type": "function", "function": {"name": ...}}``. Absent means "auto" with tools and
    "none" without (as does "auto" without tools); a forced call without tools is an error."""
    names = [t["function"]["name"] for t in check_tools(tools)]
    if isinstance(choice, ToolChoice):
        mode, name = choice.mode, choice.name
    elif choice is None:
        mode, name = "auto", None
    elif isinstance(choice, str):
        if choice not in MODES:
            raise ToolCallError('tool_choice must be "auto", "none", "required" or {"type": '
                                f'"function", "function": {{"name": ...}}}}, got {choice!r}')
        mode, name = choice, None
    elif isinstance(choice, Mapping):
        if choice.get("type") != "function":
            raise ToolCallError(f'tool_choice.type must be "function", '
                                f"got {choice.get('type')!r}")
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str):
            raise ToolCallError('tool_choice.function.name must name one of the tools '
                                '({"type": "function", "function": {"name": ...}})')
        mode = "required"
    else:
        raise ToolCallError(f"tool_choice must be a string or an object, "
                            f"not {type(choice).__name__}")
    if not names:
        if mode == "required":
            what = f"names {name!r}" if name else 'is "required"'
            raise ToolCallError(f"tool_choice {what} but the request has no tools")
        return ToolChoice("none")
    if name is not None and name not in names:
        raise ToolCallError(f"tool_choice names {name!r}, which is not one of the tools "
                            f"({', '.join(names)})")
    return ToolChoice(mode, name)


# ---- grammars ---------------------------------------------------------------------------------

Specials = Mapping[str, int] | Collection[str]


def _lit(text: str) -> str:
    """A Lark string literal (JSON's escapes are Lark's)."""
    return json.dumps(text, ensure_ascii=False)


def _special(text: str, specials: Specials) -> str | None:
    """The Lark reference of special token ``text`` (None when the vocabulary has no such
    special token). llguidance names a special token by text only in the ``<...>`` form."""
    if isinstance(specials, Mapping):
        return f"<[{int(specials[text])}]>" if text in specials else None
    if text not in specials:
        return None
    if text.startswith("<") and text.endswith(">"):
        return text
    raise ToolCallError(f"{text} is a control token of this vocabulary; a grammar can only "
                        "reference it by id: pass specials as a mapping of text to token id "
                        "(special_markers(tokenizer))")


def _marker(text: str, specials: Specials) -> str:
    return _special(text, specials) or _lit(text)


def special_markers(tokenizer: Any) -> dict[str, int]:
    """The syntax markers that are special tokens of ``tokenizer``'s vocabulary (as
    :mod:`pyllm.runtime.grammar` shows tokens to llguidance: control tokens, and user-defined
    ones that look like ``<...>``), text -> id: the ``specials`` argument of ``grammar``."""
    from pyllm.tokenizer.vocab import TokenType

    out: dict[str, int] = {}
    for text in (PYTHON_TAG, TOOL_CALL_OPEN, TOOL_CALL_CLOSE, TOOL_CALLS):
        tid = tokenizer.token_to_id(text)
        if tid is None:
            continue
        kind = tokenizer.token_type(tid)
        if kind == TokenType.CONTROL or (kind == TokenType.USER_DEFINED and text[0] == "<"):
            out[text] = int(tid)
    return out


def _schema_rule(params: Mapping[str, Any]) -> str:
    # the one-line JSON every grammar writes; objects closed as Grammar.json_schema closes them
    from pyllm.runtime.grammar import JSON_OPTIONS, closed_objects

    schema = closed_objects(dict(params))
    schema.setdefault("x-guidance", JSON_OPTIONS)
    return "%json " + json.dumps(schema, ensure_ascii=False)


# ---- the syntaxes -----------------------------------------------------------------------------

def _result_value(content: str) -> Any:
    """A tool result as a JSON value: its JSON when it is JSON text, else the text."""
    try:
        return loads(content)
    except ValueError:
        return content


def _finish(pieces: Sequence[str], parsed: Sequence[Parsed],
            mistral_ids: bool = False) -> tuple[str | None, list[ToolCall]]:
    return "".join(pieces).rstrip() or None, make_calls(parsed, mistral_ids)


class ToolSyntax:
    """One family's tool syntax. Use the instances :data:`LLAMA3`, :data:`HERMES`,
    :data:`MISTRAL`, :data:`GENERIC`."""

    name = ""
    markers: tuple[str, ...] = ()  # texts the reply may contain that must not be dropped
    always_constrained = False  # the grammar applies to "auto" replies too
    args_key = "arguments"  # the key of a call object that holds the arguments

    def __repr__(self) -> str:
        return f"<ToolSyntax {self.name}>"

    # prompts
    def system_prompt(self, tools: Any) -> str:
        """The tools and how to call them, for a prompt whose template cannot carry tools."""
        raise NotImplementedError

    def render_turn(self, content: str | None, calls: Sequence[ToolCall]) -> str:
        """An assistant turn with (optional) content that made ``calls``, as text."""
        raise NotImplementedError

    def render_calls(self, calls: Sequence[ToolCall]) -> str:
        """An assistant turn that made ``calls``, as text in this syntax."""
        return self.render_turn(None, calls)

    def render_result(self, content: str, call_id: str | None, name: str | None
                      ) -> dict[str, Any]:
        """A tool's result as a message any template or format renders (role "user")."""
        result: dict[str, Any] = {}
        if name is not None:
            result["name"] = name
        if call_id is not None:
            result["id"] = call_id
        result["content"] = _result_value(content)
        return {"role": "user",
                "content": json.dumps({"tool_response": result}, ensure_ascii=False)}

    # grammar
    def grammar(self, tools: Any, choice: ToolChoice, parallel: bool,
                specials: Specials = ()) -> str | None:
        """llguidance Lark grammar of the reply, or None when the model writes freely ("none",
        and "auto" except for GENERIC). Forced: exactly this syntax's calls, names limited to
        the allowed tool(s), arguments to their schema; several calls only when ``parallel``
        (a named choice makes one). ``specials``: the vocabulary's special tokens, as texts
        or (needed for ``[TOOL_CALLS]``) a text -> id mapping; markers among them are
        referenced as tokens, others written as text."""
        checked = check_tools(tools)
        if not checked or choice.mode == "none":
            return None
        if choice.mode == "auto" and not self.always_constrained:
            return None
        allowed = [t["function"] for t in checked
                   if choice.name is None or t["function"]["name"] == choice.name]
        if not allowed:
            raise ToolCallError(f"tool_choice names {choice.name!r}, which is not one of the "
                                "tools")
        lines = [self._start(parallel and choice.name is None, choice.mode == "auto",
                             specials)]
        lines.append("call: " + " | ".join(f"call{i}" for i in range(len(allowed))))
        for i, fn in enumerate(allowed):
            lines.append(f"call{i}: {self._call(fn['name'], f'args{i}')}")
            lines.append(f"args{i}: {_schema_rule(fn['parameters'])}")
        return "\n".join(lines) + "\n"

    def _start(self, many: bool, auto: bool, specials: Specials) -> str:
        raise NotImplementedError

    def _call(self, name: str, args_rule: str) -> str:
        # tool names are [a-zA-Z0-9_-]: nothing in them needs escaping
        head = f'{{"name": "{name}", "{self.args_key}": '
        return f"{_lit(head)} {args_rule} {_lit('}')}"

    # reading replies
    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A whole reply -> (content or None, calls). Text that is not a valid call is content
        (model output never raises); arguments come back as compact JSON."""
        if not isinstance(text, str):
            raise ToolCallError(f"parse() takes the reply's text, not {type(text).__name__}")
        return self._parse(text)

    def _parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        raise NotImplementedError

    def stream_parser(self) -> ToolStreamParser:
        """A parser for one streamed reply (:mod:`pyllm.chat.tool_stream`)."""
        raise NotImplementedError


def _tool_lines(tools: Any, indent: int | None = None) -> list[str]:
    return [json.dumps(t, ensure_ascii=False, indent=indent) for t in check_tools(tools)]


def _args(call: ToolCall) -> Any:
    try:
        return loads(call.arguments)
    except ValueError:
        raise ToolCallError(f"the arguments of call {call.id!r} ({call.name}) are not JSON: "
                            f"{call.arguments[:80]!r}") from None


class _Llama3(ToolSyntax):
    name = "llama3"
    markers = (PYTHON_TAG,)
    args_key = "parameters"

    def system_prompt(self, tools: Any) -> str:
        body = "\n\n".join(_tool_lines(tools, indent=4))
        return ("You can use the functions below. To call one, reply with nothing but a JSON "
                'object {"name": function name, "parameters": object of argument names and '
                "values}, with the values written out (no variables). Otherwise answer "
                f"normally.\n\n{body}")

    def render_turn(self, content: str | None, calls: Sequence[ToolCall]) -> str:
        text = "; ".join(json.dumps({"name": c.name, "parameters": _args(c)}, ensure_ascii=False)
                         for c in calls)
        # a call after text needs the tag: without it only a reply that is all calls is one
        return f"{content}{PYTHON_TAG}{text}" if content else text

    def _start(self, many: bool, auto: bool, specials: Specials) -> str:
        tag = _special(PYTHON_TAG, specials)  # only a vocabulary that has the tag writes it
        more = f' ({_lit("; ")} call)*' if many else ""
        return f"start: {tag + '? ' if tag else ''}call{more}"

    def _parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        i = text.find(PYTHON_TAG)
        if i >= 0:
            parsed = llama_calls(text[i + len(PYTHON_TAG):])
            return _finish([text[:i]], parsed) if parsed is not None else _finish([text], [])
        if text.lstrip().startswith("{"):
            parsed = llama_calls(text)
            if parsed is not None:
                return _finish([], parsed)
        return _finish([text], [])

    def stream_parser(self) -> ToolStreamParser:
        return LlamaStream()


class _Hermes(ToolSyntax):
    name = "hermes"
    markers = (TOOL_CALL_OPEN, TOOL_CALL_CLOSE)

    def system_prompt(self, tools: Any) -> str:
        listed = "\n".join(_tool_lines(tools))
        return ("# Tools\n\nYou may call functions to help with the user's request. Their "
                f"signatures are listed inside <tools></tools>, one per line:\n<tools>\n{listed}"
                "\n</tools>\n\nTo call a function, write a JSON object with its name and "
                "arguments inside <tool_call></tool_call> tags, one block per call:\n"
                '<tool_call>\n{"name": <function-name>, "arguments": <arguments-json-object>}'
                "\n</tool_call>")

    def render_turn(self, content: str | None, calls: Sequence[ToolCall]) -> str:
        blocks = "\n".join(
            f"{TOOL_CALL_OPEN}\n"
            f"{json.dumps({'name': c.name, 'arguments': _args(c)}, ensure_ascii=False)}\n"
            f"{TOOL_CALL_CLOSE}" for c in calls)
        return f"{content}\n{blocks}" if content else blocks

    def render_result(self, content: str, call_id: str | None, name: str | None
                      ) -> dict[str, Any]:
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}

    def _start(self, many: bool, auto: bool, specials: Specials) -> str:
        more = f' ({_lit(chr(10))} block)*' if many else ""
        return (f"start: block{more}\nblock: {_marker(TOOL_CALL_OPEN, specials)} "
                f"{_lit(chr(10))} call {_lit(chr(10))} {_marker(TOOL_CALL_CLOSE, specials)}")

    def _parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        pieces: list[str] = []
        parsed: list[Parsed] = []
        pos = 0
        while True:
            i = text.find(TOOL_CALL_OPEN, pos)
            if i < 0:
                pieces.append(text[pos:])
                break
            pieces.append(text[pos:i])
            j = text.find(TOOL_CALL_CLOSE, i + len(TOOL_CALL_OPEN))
            end = len(text) if j < 0 else j + len(TOOL_CALL_CLOSE)
            call = hermes_block(text[i + len(TOOL_CALL_OPEN):len(text) if j < 0 else j])
            if call is None:
                pieces.append(text[i:end])
            else:
                parsed.append(call)
            if j < 0:
                break
            pos = end
        return _finish(pieces, parsed)

    def stream_parser(self) -> ToolStreamParser:
        return HermesStream()


class _Mistral(ToolSyntax):
    name = "mistral"
    markers = (TOOL_CALLS,)

    def system_prompt(self, tools: Any) -> str:
        listed = json.dumps(check_tools(tools), ensure_ascii=False)
        return (f"[AVAILABLE_TOOLS]{listed}[/AVAILABLE_TOOLS]\nTo call tools, reply with "
                '[TOOL_CALLS] and a JSON list of calls: [{"name": function name, "arguments": '
                '{...}, "id": 9 letters or digits}].')

    def render_turn(self, content: str | None, calls: Sequence[ToolCall]) -> str:
        items = [{"name": c.name, "arguments": _args(c), "id": mistral_id(c.id)} for c in calls]
        return f"{content or ''}{TOOL_CALLS}{json.dumps(items, ensure_ascii=False)}"

    def render_result(self, content: str, call_id: str | None, name: str | None
                      ) -> dict[str, Any]:
        result: dict[str, Any] = {"content": _result_value(content)}
        if call_id is not None:
            result["call_id"] = mistral_id(call_id)
        return {"role": "user", "content":
                f"[TOOL_RESULTS]{json.dumps(result, ensure_ascii=False)}[/TOOL_RESULTS]"}

    def _start(self, many: bool, auto: bool, specials: Specials) -> str:
        # after the control token a SentencePiece vocabulary writes "▁[": the space is allowed
        more = f' ({_lit(", ")} call)*' if many else ""
        return f'start: {_marker(TOOL_CALLS, specials)} " "? "[" call{more} "]"'

    def _call(self, name: str, args_rule: str) -> str:
        head, sep, tail = f'{{"name": "{name}", "arguments": ', ', "id": "', '"}'
        return f"{_lit(head)} {args_rule} {_lit(sep)} /[a-zA-Z0-9]{{9}}/ {_lit(tail)}"

    def _parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        i = text.find(TOOL_CALLS)
        if i >= 0:
            parsed = mistral_calls(text[i + len(TOOL_CALLS):])
            if parsed is not None:
                return _finish([text[:i]], parsed, mistral_ids=True)
        return _finish([text], [])

    def stream_parser(self) -> ToolStreamParser:
        return MistralStream()


class _Generic(ToolSyntax):
    name = "generic"
    always_constrained = True

    def system_prompt(self, tools: Any) -> str:
        lines = []
        for tool in check_tools(tools):
            fn = tool["function"]
            lines.append(f"- {fn['name']}: {fn.get('description', '')}".rstrip())
            lines.append(f"  parameters (JSON schema): "
                         f"{json.dumps(fn['parameters'], ensure_ascii=False)}")
        listed = "\n".join(lines)
        return ("You can call these tools:\n"
                f"{listed}\n\nReply with one JSON object and nothing else, in one of two forms:\n"
                '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]} to call '
                "tools (one item per call), or\n"
                '{"response": "<your answer>"} to answer without a tool.')

    def render_turn(self, content: str | None, calls: Sequence[ToolCall]) -> str:
        # the reply is one JSON object: a turn with calls carries only the calls
        items = [{"name": c.name, "arguments": _args(c)} for c in calls]
        return json.dumps({"tool_calls": items}, ensure_ascii=False)

    def _start(self, many: bool, auto: bool, specials: Specials) -> str:
        more = f' ({_lit(", ")} call)*' if many else ""
        head, tail, resp = '{"tool_calls": [', "]}", '{"response": '
        calls = f"calls: {_lit(head)} call{more} {_lit(tail)}"
        if not auto:
            return f"start: calls\n{calls}"
        return (f"start: calls | response\n{calls}\n"
                f"response: {_lit(resp)} text {_lit('}')}\n"
                'text: %json {"type": "string"}')

    def _parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        head = text.lstrip()
        if match_opening(head, TOOL_CALLS_OPENING)[0] == Opening.YES:
            parsed = generic_calls(text)
            return _finish([], parsed) if parsed is not None else _finish([text], [])
        state, end = match_opening(head, RESPONSE_OPENING)
        if state != Opening.YES:
            return _finish([text], [])
        body, used, closed = decode_string(head[end:], final=True)
        rest = head[end + used:] if closed else ""
        return _finish([body] if rest.strip() in ("}", "") else [body, rest], [])

    def stream_parser(self) -> ToolStreamParser:
        return GenericStream()


LLAMA3: ToolSyntax = _Llama3()
HERMES: ToolSyntax = _Hermes()
MISTRAL: ToolSyntax = _Mistral()
GENERIC: ToolSyntax = _Generic()
SYNTAXES: dict[str, ToolSyntax] = {s.name: s for s in (LLAMA3, HERMES, MISTRAL, GENERIC)}

# built-in chat formats (pyllm.chat.formats, aliases resolved) of families with a tool syntax
_FORMAT_SYNTAX = {"chatml": HERMES, "llama-3": LLAMA3, "mistral-instruct": MISTRAL}


def detect_syntax(template: str | None, format_name: str | None = None) -> ToolSyntax:
    """The tool syntax of a Jinja chat template (by the markers it writes), else of a built-in
    format name; GENERIC for everything else."""
    if template is not None and not isinstance(template, str):
        raise ToolCallError(f"template must be a str, not {type(template).__name__}")
    if template:
        if TOOL_CALL_OPEN in template:
            return HERMES
        if TOOL_CALLS in template or "[AVAILABLE_TOOLS]" in template:
            return MISTRAL
        if "<|start_header_id|>" in template and any(
                k in template for k in ("tools", "ipython", PYTHON_TAG)):
            return LLAMA3
    if format_name:
        from pyllm.chat.formats import ALIASES

        return _FORMAT_SYNTAX.get(ALIASES.get(format_name, format_name), GENERIC)
    return GENERIC


def template_handles_tools(template: str | None) -> bool:
    """The Jinja template reads the ``tools`` variable (so it renders tools itself)."""
    if not template:
        return False
    prev = ""
    try:
        for _, kind, value in jinja2.Environment().lex(template):
            if kind == "name" and value == "tools" and prev != ".":  # not ``message.tools``
                return True
            if kind != "whitespace":
                prev = value
    except jinja2.TemplateSyntaxError:
        return False  # a template that cannot be lexed cannot render anything
    return False


# ---- conversations ----------------------------------------------------------------------------

def _message_calls(m: Mapping[str, Any], i: int) -> list[ToolCall]:
    raw = m.get("tool_calls")
    if raw is None:
        return []
    if m.get("role") != "assistant":
        raise ToolCallError(f"messages[{i}] has tool_calls but role {m.get('role')!r}; only "
                            "assistant messages make calls")
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Sequence):
        raise ToolCallError(f"messages[{i}].tool_calls must be a list, not {type(raw).__name__}")
    calls = []
    for j, item in enumerate(raw):
        where = f"messages[{i}].tool_calls[{j}]"
        if not isinstance(item, Mapping) or item.get("type", "function") != "function":
            raise ToolCallError(f'{where} must be {{"type": "function", "function": {{...}}}}')
        fn = item.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ToolCallError(f"{where}.function.name must be a tool name, got {name!r}")
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = loads(args)
            except ValueError as e:
                raise ToolCallError(f"{where}.function.arguments is not JSON: {e}") from None
        if not isinstance(args, Mapping):
            raise ToolCallError(f"{where}.function.arguments must be a JSON object (as text), "
                                f"got {type(args).__name__}")
        call_id = item.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise ToolCallError(f"{where}.id must be a string, not {type(call_id).__name__}")
        try:
            arguments = compact(dict(args))
        except (TypeError, ValueError) as e:
            raise ToolCallError(f"{where}.function.arguments is not JSON: {e}") from None
        calls.append(ToolCall(call_id or f"call_{i}_{j}", name, arguments))
    return calls


def _text(content: Any, where: str) -> str:
    """Message content as text: a string, None (""), or OpenAI's list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = [p.get("text") for p in content if isinstance(p, Mapping)]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "".join(t for t in texts if isinstance(t, str))
    raise ToolCallError(f"{where} content must be text or a list of "
                        f'{{"type": "text", "text": ...}} parts, not {type(content).__name__}')


def prepare_messages(messages: Any, tools: Any, syntax: ToolSyntax, native: bool
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """A conversation with tools, calls and results, ready for :func:`pyllm.chat.render`.

    ``native`` (the template renders tools itself): (messages with each call's arguments as a
    dict, results kept as role "tool"; the checked tools, None when there are none). Llama 3
    templates take one call per turn, so a turn with several becomes several turns; Mistral
    templates take only 9-character ids, so other ids are mapped (a call and its result alike).

    Otherwise: (messages, None) where the system message also describes the tools
    (``syntax.system_prompt``; a system message is added when there is none), a turn with calls
    is text in the syntax and results are ``syntax.render_result`` messages (consecutive ones,
    and a user message right after them, joined into one turn), so any template or format
    renders them. A result without ``tool_call_id`` answers the next unanswered call.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ToolCallError(f"messages must be a list, not {type(messages).__name__}")
    checked = check_tools(tools)
    out: list[dict[str, Any]] = []
    pending: list[str] = []  # calls of the last assistant turn not yet answered, by id
    names: dict[str, str] = {}
    merging = False  # out[-1] is a turn of tool results that may take more
    for i, raw in enumerate(messages):
        if not isinstance(raw, Mapping):
            raise ToolCallError(f"messages[{i}] must be an object, not {type(raw).__name__}")
        m = {k: v for k, v in raw.items() if k != "tool_calls"}
        role = m.get("role")
        calls = _message_calls(raw, i)
        if calls:
            pending = [c.id for c in calls]
            names.update((c.id, c.name) for c in calls)
            merging = False
            if not native:
                content = _text(m.get("content"), f"messages[{i}] (assistant)")
                m["content"] = syntax.render_turn(content or None, calls)
                out.append(m)
                continue
            m.setdefault("content", None)
            items = [{"id": mistral_id(c.id) if syntax is MISTRAL else c.id, "type": "function",
                      "function": {"name": c.name, "arguments": loads(c.arguments)}}
                     for c in calls]
            groups = [[item] for item in items] if syntax is LLAMA3 else [items]
            out.extend({**m, "tool_calls": group} for group in groups)
            continue
        if role not in TOOL_RESULT_ROLES:
            if native or not (merging and role == "user" and isinstance(m.get("content"), str)):
                out.append(m)
                merging = False
            else:
                out[-1]["content"] += "\n\n" + m["content"]
            continue
        content = _text(m.get("content"), f"messages[{i}] (a tool result)")
        call_id = m.get("tool_call_id")
        if call_id is not None and not isinstance(call_id, str):
            raise ToolCallError(f"messages[{i}].tool_call_id must be a string")
        if call_id is None and pending:
            call_id = pending[0]
        if call_id in pending:
            pending.remove(call_id)
        name = m.get("name") if isinstance(m.get("name"), str) else names.get(call_id or "")
        if native:
            m["content"] = content
            if call_id is not None:
                m["tool_call_id"] = mistral_id(call_id) if syntax is MISTRAL else call_id
            if name is not None:
                m["name"] = name
            out.append(m)
            continue
        result = syntax.render_result(content, call_id, name)
        if merging and out[-1]["role"] == result["role"]:
            out[-1]["content"] += "\n" + result["content"]
        else:
            out.append(result)
            merging = True
    if native:
        return out, checked or None
    if checked:
        prompt = syntax.system_prompt(checked)
        if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
            first = out[0]["content"]
            out[0] = {**out[0], "content": f"{first}\n\n{prompt}" if first else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


__all__ = [
    "GENERIC",
    "HERMES",
    "LLAMA3",
    "MISTRAL",
    "SYNTAXES",
    "CallDelta",
    "ContentDelta",
    "Delta",
    "ToolCall",
    "ToolChoice",
    "ToolStreamParser",
    "ToolSyntax",
    "check_tool_choice",
    "check_tools",
    "detect_syntax",
    "prepare_messages",
    "special_markers",
    "template_handles_tools",
]
