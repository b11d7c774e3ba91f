"""Chat prompts: GGUF Jinja chat templates (sandboxed) and named built-in chat formats.

    from pyllm.chat import render, stop_strings
    prompt = render(messages, reader.metadata["tokenizer.chat_template"], tokenizer=tok)
    prompt = render(messages, "llama-2")            # a built-in format, for files without one
    stops = stop_strings("llama-2")                 # ["</s>"]

``template_or_format`` is a Jinja template string, a registered format name, a
:class:`ChatFormat` or a compiled :class:`ChatTemplate`. Pure Python; no compiled extension.

BOS/EOS text: an explicit ``bos_token``/``eos_token`` wins; otherwise a ``tokenizer`` (anything
with ``token_to_piece(id)``, ``bos_id``, ``eos_id``) supplies them; otherwise a template gets ""
and a format its own default (e.g. ``"<s>"``). The rendered prompt already contains any BOS the
layout wants, so tokenize it without adding special tokens (:func:`render_ids` does that).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from pyllm.chat.formats import (
    BOS,
    BUILTIN_FORMATS,
    EOS,
    ChatFormat,
    Part,
    SpecialToken,
    TokenId,
    get_format,
    guess_format,
    is_format_name,
    list_formats,
    parse_fastllm,
    register_format,
    render_format_parts,
)
from pyllm.chat.templates import ChatTemplate, looks_like_template, validate_messages
from pyllm.errors import ChatTemplateError


class ChatTokenizer(Protocol):
    """What chat rendering needs from a tokenizer (pyllm.Tokenizer provides it)."""

    bos_id: int | None
    eos_id: int | None

    def token_to_piece(self, token_id: int) -> str: ...


TemplateOrFormat = str | ChatFormat | ChatTemplate
Messages = Sequence[Mapping[str, Any]]

# End-of-turn markers of template families that have no built-in format (Gemma, Phi-3,
# Command-R, OpenChat, ...); stop_strings() falls back to those a template mentions.
_END_MARKERS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|EOT|>",
    "<end_of_turn>",
    "<|end|>",
    "<|END_OF_TURN_TOKEN|>",
    "<|end_of_turn|>",
    "<eoa>",
)


def _resolve(template_or_format: TemplateOrFormat) -> ChatFormat | ChatTemplate:
    if isinstance(template_or_format, (ChatFormat, ChatTemplate)):
        return template_or_format
    if not isinstance(template_or_format, str):
        raise ChatTemplateError(
            "template_or_format must be a template string, a format name or a ChatFormat, "
            f"not {type(template_or_format).__name__}"
        )
    if is_format_name(template_or_format):
        return get_format(template_or_format)
    if looks_like_template(template_or_format):
        return ChatTemplate(template_or_format)
    # Neither Jinja markup nor a known name: most likely a misspelt format name.
    return get_format(template_or_format)


def _piece(tokenizer: ChatTokenizer, token_id: int) -> str:
    try:
        piece: Any = tokenizer.token_to_piece(token_id)
    except Exception as e:
        raise ChatTemplateError(f"tokenizer cannot give the text of token {token_id}: {e}") from e
    if isinstance(piece, bytes):
        piece = piece.decode("utf-8", errors="replace")
    if not isinstance(piece, str):
        raise ChatTemplateError(f"token_to_piece({token_id}) returned {type(piece).__name__}")
    return piece


def _special_text(
    explicit: str | None, tokenizer: ChatTokenizer | None, attr: str, default: str
) -> str:
    if explicit is not None:
        if not isinstance(explicit, str):
            raise ChatTemplateError(
                f"{attr[:3]}_token must be a str, not {type(explicit).__name__}"
            )
        return explicit
    if tokenizer is not None:
        token_id = getattr(tokenizer, attr, None)
        if token_id is None or token_id < 0:
            return ""  # the model has no such token
        return _piece(tokenizer, int(token_id))
    return default


def render_parts(
    messages: Messages,
    template_or_format: TemplateOrFormat,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    add_generation_prompt: bool = True,
    tokenizer: ChatTokenizer | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    **template_vars: Any,
) -> list[Part]:
    """The prompt as text runs and fixed token ids (ints), in order.

    Only formats with fixed token ids (fastllm's ``<FLM_FIX_TOKEN_n>``) produce ints; every
    other prompt is a single text run.
    """
    target = _resolve(template_or_format)
    if isinstance(target, ChatTemplate):
        bos = _special_text(bos_token, tokenizer, "bos_id", "")
        eos = _special_text(eos_token, tokenizer, "eos_id", "")
        text = target.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos,
            eos_token=eos,
            tools=tools,
            **template_vars,
        )
        return [text] if text else []
    if tools is not None or template_vars:
        raise ChatTemplateError("tools and template variables need a Jinja template, not a format")
    return render_format_parts(
        target,
        messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=_special_text(bos_token, tokenizer, "bos_id", target.bos_token),
        eos_token=_special_text(eos_token, tokenizer, "eos_id", target.eos_token),
    )


def render(
    messages: Messages,
    template_or_format: TemplateOrFormat,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    add_generation_prompt: bool = True,
    tokenizer: ChatTokenizer | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    **template_vars: Any,
) -> str:
    """Render a conversation to prompt text.

    Extra keyword arguments (and ``tools``) become variables of a Jinja template. Fixed token
    ids of a format become their text via ``tokenizer.token_to_piece``; without a tokenizer
    such a format raises — use :func:`render_parts` or :func:`render_ids` instead.

    Args:
        messages: The conversation: mappings with ``role`` and ``content`` (and, for tool
            calls, ``tool_calls`` / ``tool_call_id``).
        template_or_format: A Jinja template string, a registered format name, a ChatFormat
            or a compiled ChatTemplate.
        bos_token: The BOS text; default: the tokenizer's, else the template's empty string
            or the format's own.
        eos_token: The EOS text, chosen as ``bos_token`` is.
        add_generation_prompt: End with the opening of the assistant's turn.
        tokenizer: Supplies the BOS/EOS text and the text of fixed token ids.
        tools: OpenAI-style tool definitions, passed to a template as ``tools``.
        **template_vars: More variables for a Jinja template.

    Returns:
        The prompt text, including any BOS the layout wants.

    Raises:
        ChatTemplateError: The template fails, escapes the sandbox, or the messages are
            malformed.
    """
    parts = render_parts(
        messages,
        template_or_format,
        bos_token=bos_token,
        eos_token=eos_token,
        add_generation_prompt=add_generation_prompt,
        tokenizer=tokenizer,
        tools=tools,
        **template_vars,
    )
    out: list[str] = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif tokenizer is None:
            raise ChatTemplateError(
                f"this chat format places fixed token id {part}; pass tokenizer= to render it "
                "as text, or use render_parts()/render_ids()"
            )
        else:
            out.append(_piece(tokenizer, part))
    return "".join(out)


def render_ids(
    messages: Messages,
    template_or_format: TemplateOrFormat,
    tokenizer: Any,
    *,
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> list[int]:
    """Render and tokenize: text runs go through ``tokenizer.encode(text, add_special=False,
    parse_special=True)`` (so ``<|im_start|>`` etc. become their single ids), fixed ids are
    inserted as they are.

    Args:
        messages: The conversation, as for :func:`render`.
        template_or_format: As for :func:`render`.
        tokenizer: Anything with ``encode(text, add_special=..., parse_special=...)``,
            ``token_to_piece``, ``bos_id`` and ``eos_id`` (a :class:`pyllm.Tokenizer`).
        add_generation_prompt: End with the opening of the assistant's turn.
        **kwargs: Passed on to :func:`render_parts` (``bos_token``, ``tools``, template
            variables).

    Returns:
        The prompt's token ids.
    """
    parts = render_parts(
        messages,
        template_or_format,
        add_generation_prompt=add_generation_prompt,
        tokenizer=tokenizer,
        **kwargs,
    )
    ids: list[int] = []
    for part in parts:
        if isinstance(part, int):
            ids.append(part)
        else:
            encoded = tokenizer.encode(part, add_special=False, parse_special=True)
            ids.extend(int(t) for t in encoded)
    return ids


def stop_strings(format_name_or_template: TemplateOrFormat) -> list[str]:
    """The strings that end the model's turn for a format (or for a recognised template).

    For a template that matches no built-in format, the known end-of-turn markers it mentions.
    Generation should also stop at the model's EOS token id.

    Args:
        format_name_or_template: A format name, a Jinja template string, a ChatFormat or a
            ChatTemplate.

    Returns:
        The end-of-turn strings (empty when none is known).
    """
    target = format_name_or_template
    if isinstance(target, ChatTemplate):
        target = target.source
    if isinstance(target, ChatFormat):
        return list(target.stop)
    if not isinstance(target, str):
        raise ChatTemplateError(
            f"stop_strings needs a name, template or ChatFormat, not {type(target).__name__}"
        )
    if is_format_name(target) or not looks_like_template(target):
        return list(get_format(target).stop)
    name = guess_format(target)
    if name is not None:
        return list(get_format(name).stop)
    return [m for m in _END_MARKERS if m in target]


__all__ = [
    "BOS",
    "BUILTIN_FORMATS",
    "EOS",
    "ChatFormat",
    "ChatTemplate",
    "ChatTokenizer",
    "Part",
    "SpecialToken",
    "TokenId",
    "get_format",
    "guess_format",
    "list_formats",
    "parse_fastllm",
    "register_format",
    "render",
    "render_ids",
    "render_parts",
    "stop_strings",
    "validate_messages",
]
