"""Jinja chat templates (``tokenizer.chat_template``) rendered in a locked-down sandbox.

A GGUF file's chat template is untrusted input: anyone can publish a model. Templates run in
jinja2's ``ImmutableSandboxedEnvironment`` (no attribute starting with ``_``, no mutation of
lists/dicts, bounded ``range``), made stricter here: touching an unsafe attribute fails at once
instead of quietly rendering as empty, and ``*``/``**`` cannot build huge strings or numbers.
Every failure — syntax error, sandbox violation, ``raise_exception(...)``, runtime error —
becomes a :class:`~pyllm.errors.ChatTemplateError` that says what went wrong.

The environment mirrors what Hugging Face's ``apply_chat_template`` gives templates, because
that is what template authors test against: ``trim_blocks``/``lstrip_blocks``, the
``loopcontrols`` extension, a ``tojson`` that does not HTML-escape, ``raise_exception`` and
``strftime_now``.

Message validation (shared with the named formats) lives here too.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment, modifies_known_mutable

from pyllm.errors import ChatTemplateError

# Roles the named formats understand. Templates may also handle tool results.
FORMAT_ROLES = frozenset({"system", "user", "assistant"})
TEMPLATE_ROLES = FORMAT_ROLES | {"tool", "ipython"}

# Hard caps on what a template may produce. A real chat prompt is far below both; a hostile
# template that tries to exhaust memory hits them instead.
MAX_OUTPUT_CHARS = 16 << 20
MAX_SEQUENCE_PRODUCT = 1 << 20  # longest str/list that ``*`` may build
MAX_POWER_BITS = 4096  # largest int that ``**`` may build
MAX_RANGE_ITEMS = 1 << 20  # total items all range() calls of one render may produce

# range() items left to the render running in this context (nested loops share one budget,
# so range(100000) inside range(100000) fails fast instead of spinning for hours).
_range_budget: ContextVar[int] = ContextVar("pyllm_chat_range_budget", default=MAX_RANGE_ITEMS)


class _TemplateRaised(Exception):
    """Raised by the ``raise_exception`` helper; turned into ChatTemplateError by render."""


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox; unsafe attribute access fails loudly, ``+ * **`` are bounded."""

    intercepted_binops = frozenset({"+", "*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # jinja2's default returns an Undefined that renders as "" and only fails when used
        # further; an escape attempt must not render silently.
        if modifies_known_mutable(obj, attribute):
            raise SecurityError(
                f"chat templates cannot modify data ({type(obj).__name__}.{attribute})"
            )
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not "
            "allowed in a chat template"
        )

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "+":
            if (
                isinstance(left, (str, list, tuple))
                and isinstance(right, (str, list, tuple))
                and len(left) + len(right) > MAX_OUTPUT_CHARS
            ):
                raise SecurityError("chat template tried to build an oversized value")
            return operator.add(left, right)
        if op == "*":
            for seq, n in ((left, right), (right, left)):
                if (
                    isinstance(seq, (str, list, tuple))
                    and isinstance(n, int)
                    and len(seq) * max(n, 0) > MAX_SEQUENCE_PRODUCT
                ):
                    raise SecurityError("chat template tried to build an oversized sequence")
            return operator.mul(left, right)
        if op == "**":
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and right > 0
                and abs(left) > 1
                and abs(left).bit_length() * right > MAX_POWER_BITS
            ):
                raise SecurityError("chat template tried to compute an oversized power")
            return operator.pow(left, right)
        return super().call_binop(context, op, left, right)


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}``: Hugging Face marks the assistant's tokens
    with it (for training masks); for rendering it is a no-op wrapper around its body."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(
    value: Any,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
    ensure_ascii: bool = False,
) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; a prompt must carry them verbatim.
    try:
        return json.dumps(
            value,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
            ensure_ascii=ensure_ascii,
        )
    except (TypeError, ValueError) as e:
        raise ChatTemplateError(f"chat template: tojson failed: {e}") from e


def _budgeted_range(*args: int) -> range:
    rng = range(*args)
    left = _range_budget.get() - len(rng)
    if left < 0:
        raise SecurityError(
            f"chat template loops too much (more than {MAX_RANGE_ITEMS} range items in total)"
        )
    _range_budget.set(left)
    return rng


def _raise_exception(message: Any = "") -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(str(fmt))


@lru_cache(maxsize=1)
def _environment() -> _StrictSandbox:
    env = _StrictSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
        extensions=["jinja2.ext.loopcontrols", _GenerationTag],
        autoescape=False,
    )
    env.filters["tojson"] = _tojson
    env.globals["range"] = _budgeted_range
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"chat template syntax error at line {e.lineno}: {e.message}"
        ) from e
    except (SecurityError, RecursionError, MemoryError) as e:
        raise ChatTemplateError(f"chat template cannot be compiled: {e}") from e


class ChatTemplate:
    """A compiled Jinja chat template. Compile once, render many conversations.

    Args:
        source: The Jinja source (a GGUF ``tokenizer.chat_template``).
    """

    def __init__(self, source: str) -> None:
        if not isinstance(source, str):
            raise ChatTemplateError(f"chat template must be a str, not {type(source).__name__}")
        self.source = source
        self._template = _compile(source)

    def __repr__(self) -> str:
        head = self.source[:40].replace("\n", "\\n")
        return f"ChatTemplate({head!r}{'...' if len(self.source) > 40 else ''})"

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        bos_token: str = "",
        eos_token: str = "",
        tools: Sequence[Mapping[str, Any]] | None = None,
        **variables: Any,
    ) -> str:
        """Render ``messages``; extra keyword arguments become template variables.

        Args:
            messages: The conversation (role / content mappings).
            add_generation_prompt: End with the opening of the assistant's turn.
            bos_token: The template's ``bos_token`` variable.
            eos_token: The template's ``eos_token`` variable.
            tools: OpenAI-style tool definitions (the ``tools`` variable).
            **variables: More template variables.

        Returns:
            The rendered prompt text.
        """
        msgs = validate_messages(messages, TEMPLATE_ROLES, for_template=True)
        context: dict[str, Any] = dict(variables)
        context.update(
            messages=msgs,
            add_generation_prompt=bool(add_generation_prompt),
            bos_token=bos_token,
            eos_token=eos_token,
            tools=None if tools is None else [dict(t) for t in tools],
        )
        token = _range_budget.set(MAX_RANGE_ITEMS)
        try:
            return _run(self._template.generate(context))
        finally:
            _range_budget.reset(token)


def _run(chunks: Iterable[str]) -> str:
    """Drain a template's output generator, turning every failure into ChatTemplateError."""
    out: list[str] = []
    size = 0
    try:
        for chunk in chunks:
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                raise ChatTemplateError(
                    f"chat template output exceeds {MAX_OUTPUT_CHARS} characters"
                )
            out.append(chunk)
    except ChatTemplateError:
        raise
    except _TemplateRaised as e:
        raise ChatTemplateError(f"chat template raised an exception: {e}") from None
    except SecurityError as e:
        raise ChatTemplateError(f"chat template blocked by the sandbox: {e}") from None
    except jinja2.UndefinedError as e:
        raise ChatTemplateError(f"chat template used an undefined value: {e}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None
    except RecursionError:
        raise ChatTemplateError("chat template recursed too deeply") from None
    except MemoryError:
        raise ChatTemplateError("chat template ran out of memory") from None
    except Exception as e:  # a template can trigger any Python error (1/0, bad index, ...)
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
    return "".join(out)


def render_template(
    source: str | ChatTemplate,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    tools: Sequence[Mapping[str, Any]] | None = None,
    **variables: Any,
) -> str:
    """Render a Jinja chat template (source text or :class:`ChatTemplate`)."""
    tmpl = source if isinstance(source, ChatTemplate) else ChatTemplate(source)
    return tmpl.render(
        messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
        tools=tools,
        **variables,
    )


def looks_like_template(text: str) -> bool:
    """True if ``text`` contains Jinja markup (so it is a template, not a format name)."""
    return "{{" in text or "{%" in text or "{#" in text


def validate_messages(
    messages: Any,
    roles: Iterable[str] = FORMAT_ROLES,
    *,
    for_template: bool = False,
) -> list[dict[str, Any]]:
    """Check the shape of a conversation and return plain-dict copies of its messages.

    Each message must be a mapping with a ``role`` from ``roles`` and a ``str`` ``content``.
    Extra keys (``tool_calls``, ``name``, ...) are passed through to templates and ignored by
    formats; for templates, an assistant message that carries ``tool_calls`` may have ``None``
    content.
    """
    allowed = frozenset(roles)
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
            f"not {type(messages).__name__}"
        )
    if len(messages) == 0:
        raise ChatTemplateError("messages is empty: a conversation needs at least one message")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ChatTemplateError(
                f"messages[{i}] must be a dict with 'role' and 'content', not {type(msg).__name__}"
            )
        role = msg.get("role")
        if not isinstance(role, str):
            raise ChatTemplateError(f"messages[{i}] has no 'role' string")
        if role not in allowed:
            raise ChatTemplateError(
                f"messages[{i}] has role {role!r}; expected one of {sorted(allowed)}"
            )
        if "content" not in msg:
            raise ChatTemplateError(f"messages[{i}] ({role}) has no 'content'")
        content = msg["content"]
        if not isinstance(content, str):
            tool_call = for_template and content is None and msg.get("tool_calls")
            if not tool_call:
                raise ChatTemplateError(
                    f"messages[{i}] ({role}) content must be a str, not {type(content).__name__}"
                )
        out.append(dict(msg))
    return out


__all__ = [
    "ChatTemplate",
    "FORMAT_ROLES",
    "TEMPLATE_ROLES",
    "looks_like_template",
    "render_template",
    "validate_messages",
]
