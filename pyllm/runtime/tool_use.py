"""The tools of one chat request: the prompt that carries them, the grammar that forces a call,
and the reading of the reply into OpenAI ``tool_calls``.

Shared by ``LLM.create_chat_completion(tools=...)`` and the server's chat completions. The
model family's syntax (Llama 3.1 JSON, Hermes/Qwen ``<tool_call>``, Mistral ``[TOOL_CALLS]``, or
the generic JSON reply for models without one) is read off the chat template by
:mod:`pyllm.chat.tools`, which also renders tools, calls and results and parses replies. A
template that renders ``tools`` itself gets them; otherwise the tools are described in the
system message and past calls and results are written out in the syntax.

``tool_choice``: "none" renders no tools and reads the reply as text; "auto" lets the model
choose (the generic syntax, whose reply is always JSON, is constrained even then);
"required" and a named function constrain the reply to a call whose arguments validate
against the function's JSON schema. ``parallel_tool_calls`` defaults to false, as in llama.cpp's
server (OpenAI's default is true): one call per reply unless several are asked for. A reply that
does not parse as calls is content.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyllm.errors import GrammarError, ToolCallError
from pyllm.runtime import openai_shapes as shapes

if TYPE_CHECKING:
    from pyllm.chat.tool_stream import Delta, ToolCall, ToolStreamParser
    from pyllm.chat.tools import ToolChoice, ToolSyntax
    from pyllm.runtime.generation import PromptTarget
    from pyllm.runtime.grammar import Grammar


@dataclass(frozen=True)
class ToolPlan:
    """How one request's reply is constrained and read."""

    syntax: ToolSyntax
    choice: ToolChoice
    grammar: Grammar | None

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content or None, calls) of a whole reply."""
        return self.syntax.parse(text)

    def stream_parser(self) -> ToolStreamParser:
        return self.syntax.stream_parser()


def _uses_tools(messages: Sequence[Mapping[str, Any]]) -> bool:
    return any(isinstance(m, Mapping) and (m.get("tool_calls") or m.get("role") in
                                           ("tool", "ipython")) for m in messages)


def chat_with_tools(target: PromptTarget, messages: Sequence[Mapping[str, Any]],
                    chat_format: str | None, tools: Any, tool_choice: Any = None,
                    parallel_tool_calls: bool | None = None
                    ) -> tuple[list[int], list[str], ToolPlan | None]:
    """The prompt tokens and stop strings of a conversation with ``tools``, and the plan of its
    reply (None when no tool can be called: no tools, or ``tool_choice`` "none")."""
    from pyllm.chat import is_format_name, looks_like_template
    from pyllm.chat.tools import (
        check_tool_choice,
        check_tools,
        detect_syntax,
        prepare_messages,
        special_markers,
        template_handles_tools,
    )
    from pyllm.runtime.generation import chat_prompt
    from pyllm.runtime.grammar import Grammar

    checked = check_tools(tools)
    choice = check_tool_choice(tool_choice, checked)
    if not checked and not _uses_tools(messages):
        tokens, stops = chat_prompt(target, messages, chat_format)
        return tokens, stops, None
    template = chat_format or target.chat_template or "llama-2"
    jinja = not is_format_name(template) and looks_like_template(template)
    syntax = detect_syntax(template if jinja else None, None if jinja else template)
    native = jinja and template_handles_tools(template)
    offered = checked if choice.mode != "none" else []
    prepared, template_tools = prepare_messages(messages, offered, syntax, native)
    tokens, stops = chat_prompt(target, prepared, chat_format, tools=template_tools)
    if choice.mode == "none":
        return tokens, stops, None
    # as llama.cpp's server: one call per reply unless several are asked for (small models,
    # free to add calls, tend to repeat the first until the token limit cuts the JSON short)
    parallel = bool(parallel_tool_calls)
    text = syntax.grammar(checked, choice, parallel, special_markers(target.tokenizer))
    grammar = None
    if text is not None:
        try:
            grammar = Grammar.lark(text).check()
        except GrammarError as e:  # a function's parameters llguidance cannot use
            raise GrammarError(f"the tools' parameter schemas cannot constrain a call: "
                               f"{e}") from None
    return tokens, stops, ToolPlan(syntax, choice, grammar)


def reply_grammar(plan: ToolPlan | None, other: Grammar | None) -> Grammar | None:
    """The reply's one constraint: a forced call's grammar, or ``other`` (a response format or
    grammar of the request); both is a ToolCallError naming tool_choice."""
    forced = plan.grammar if plan is not None else None
    if forced is not None and other is not None:
        raise ToolCallError("a forced tool call (tool_choice) and a response format or grammar "
                            "cannot both constrain the reply")
    return forced if forced is not None else other


def reply_fields(plan: ToolPlan | None, text: str, finish_reason: str | None
                 ) -> tuple[str | None, list[dict[str, Any]] | None, str | None]:
    """(content, OpenAI tool_calls or None, finish_reason) of a whole reply: a reply that
    ended normally with calls has finish_reason "tool_calls"."""
    if plan is None:
        return text, None, finish_reason
    content, calls = plan.parse(text)
    if not calls:
        return text, None, finish_reason
    reason = "tool_calls" if finish_reason == "stop" else finish_reason
    return content, [c.to_openai() for c in calls], reason


class ToolDeltas:
    """One streamed choice as OpenAI deltas: content as it comes, and with a plan the text that
    may be a call held back until the syntax's parser knows, then each call as a
    ``tool_calls`` delta."""

    def __init__(self, plan: ToolPlan | None) -> None:
        self._parser = plan.stream_parser() if plan is not None else None
        self.calls = 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self._parser is None:
            return [shapes.content_delta(text)]
        return self._shape(self._parser.feed(text))

    def finish(self) -> list[dict[str, Any]]:
        return [] if self._parser is None else self._shape(self._parser.finish())

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.calls and reason == "stop" else reason

    def _shape(self, deltas: list[Delta]) -> list[dict[str, Any]]:
        from pyllm.chat.tool_stream import ContentDelta

        out: list[dict[str, Any]] = []
        for d in deltas:
            if isinstance(d, ContentDelta):
                if d.text:
                    out.append(shapes.content_delta(d.text))
            else:
                if d.id is not None:
                    self.calls += 1
                out.append(shapes.tool_calls_delta([d.to_openai()]))
        return out


__all__ = ["ToolDeltas", "ToolPlan", "chat_with_tools", "reply_fields", "reply_grammar"]
