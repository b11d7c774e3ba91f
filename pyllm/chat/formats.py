"""Named chat formats: prompt layouts for models whose GGUF files carry no chat template.

A :class:`ChatFormat` describes a layout the way fastllm does — ``pre_prompt``, ``user_role``,
``bot_role``, ``history_sep`` — plus the few things fastllm leaves implicit: where a system
message goes, what closes a user turn, what precedes a reply in the history, whether contents
are stripped, and which stop strings end the model's turn. Every field is a sequence of
*pieces*: literal text, :data:`BOS` / :data:`EOS` (the model's own begin/end-of-sequence text),
or a fixed :class:`TokenId` that must reach the model as that exact id (fastllm's
``<FLM_FIX_TOKEN_n>``).

Rendering lays out one conversation as::

    pre_prompt [system block] ( user_role [system block] content user_suffix
                                bot_role reply_prefix reply history_sep )*
    user_role content user_suffix bot_role        <- the generation prompt

where the system block (``system_prefix`` system text ``system_suffix``) sits right after
``pre_prompt``, or inside the first user turn for layouts like Llama 2's ``<<SYS>>``.

The built-in layouts follow each model's own reference (its Hugging Face chat template or its
authors' prompt code); their literal output is pinned by ``tests/test_chat.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pyllm.chat.templates import FORMAT_ROLES, validate_messages
from pyllm.errors import ChatTemplateError


@dataclass(frozen=True)
class TokenId:
    """A fixed token id placed in the prompt as-is (never produced by tokenizing text)."""

    id: int

    def __post_init__(self) -> None:
        if isinstance(self.id, bool) or not isinstance(self.id, int) or self.id < 0:
            raise ChatTemplateError(f"TokenId needs a non-negative int, got {self.id!r}")


@dataclass(frozen=True)
class SpecialToken:
    """The model's BOS or EOS: text from the tokenizer, or the format's default text."""

    which: str  # "bos" | "eos"

    def __repr__(self) -> str:
        return self.which.upper()


BOS = SpecialToken("bos")
EOS = SpecialToken("eos")

Piece = str | TokenId | SpecialToken
# What a field may be given as: one piece, an int (a fixed token id), or a sequence of those.
PieceLike = str | int | TokenId | SpecialToken | Sequence[str | int | TokenId | SpecialToken]

_FLM_FIX_TOKEN = re.compile(r"<FLM_FIX_TOKEN_(\d+)>")


def _pieces(value: Any, what: str) -> tuple[Piece, ...]:
    """Normalise a field value to a tuple of pieces, dropping empty strings."""
    items: Iterable[Any]
    if isinstance(value, (str, int, TokenId, SpecialToken)):
        items = (value,)
    elif isinstance(value, Sequence):
        items = value
    else:
        raise ChatTemplateError(f"ChatFormat.{what}: expected text, ids or pieces, got {value!r}")
    out: list[Piece] = []
    for item in items:
        if isinstance(item, bool):
            raise ChatTemplateError(f"ChatFormat.{what}: {item!r} is not a piece")
        if isinstance(item, int):
            item = TokenId(item)
        if not isinstance(item, (str, TokenId, SpecialToken)):
            raise ChatTemplateError(f"ChatFormat.{what}: {item!r} is not a piece")
        if item != "":
            out.append(item)
    return tuple(out)


def parse_fastllm(text: str) -> tuple[Piece, ...]:
    """Split fastllm's string syntax into pieces: ``<FLM_FIX_TOKEN_n>`` becomes ``TokenId(n)``."""
    out: list[Piece] = []
    pos = 0
    for m in _FLM_FIX_TOKEN.finditer(text):
        if m.start() > pos:
            out.append(text[pos : m.start()])
        out.append(TokenId(int(m.group(1))))
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return tuple(out)


_PIECE_FIELDS = (
    "pre_prompt",
    "user_role",
    "user_suffix",
    "bot_role",
    "reply_prefix",
    "history_sep",
    "system_prefix",
    "system_suffix",
)


@dataclass(frozen=True)
class ChatFormat:
    """A prompt layout. Field names follow fastllm where fastllm has the concept."""

    pre_prompt: PieceLike = ()  # once, at the very start (BOS usually goes here)
    user_role: PieceLike = ()  # before each user message
    bot_role: PieceLike = ()  # opens the assistant's reply; the generation prompt ends with it
    history_sep: PieceLike = ()  # after each finished reply (a final BOS only if a turn follows)
    user_suffix: PieceLike = ()  # closes each user message (fastllm folds this into bot_role)
    reply_prefix: PieceLike = ()  # between bot_role and a finished reply (not in the gen prompt)
    system_prefix: PieceLike = ()  # wraps the system text ...
    system_suffix: PieceLike = ()  # ... on both sides
    system_in_first_user: bool = False  # system block goes inside the first user turn
    default_system: str | None = None  # system text used when the conversation has none
    strip_content: bool = False  # strip surrounding whitespace from every message
    bos_token: str = ""  # BOS text when neither the caller nor a tokenizer gives one
    eos_token: str = ""  # EOS text, likewise
    stop: tuple[str, ...] = ()  # strings that end the model's turn
    description: str = ""

    def __post_init__(self) -> None:
        for name in _PIECE_FIELDS:
            object.__setattr__(self, name, _pieces(getattr(self, name), name))
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ChatTemplateError("ChatFormat.stop must be a sequence of non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        for name in ("bos_token", "eos_token", "description"):
            if not isinstance(getattr(self, name), str):
                raise ChatTemplateError(f"ChatFormat.{name} must be a str")
        if self.default_system is not None and not isinstance(self.default_system, str):
            raise ChatTemplateError("ChatFormat.default_system must be a str or None")

    @classmethod
    def from_fastllm(
        cls,
        pre_prompt: str = "",
        user_role: str = "",
        bot_role: str = "",
        history_sep: str = "",
        **extra: Any,
    ) -> ChatFormat:
        """A format from fastllm's four strings (``<FLM_FIX_TOKEN_n>`` marks a fixed token id).

        Rendering then matches fastllm's own prompt building exactly::

            pre_prompt + (user_role + q + bot_role + a + history_sep)* + user_role + q + bot_role

        fastllm has no system role: a system message's text goes right after ``pre_prompt``,
        shaped by ``system_prefix``/``system_suffix`` if given in ``extra``.

        Args:
            pre_prompt: Text before the first turn.
            user_role: Text before each user message.
            bot_role: Text between a user message and the reply.
            history_sep: Text after each reply.
            **extra: Other ChatFormat fields (e.g. ``name``, ``default_system``).

        Returns:
            The format.
        """
        return cls(
            pre_prompt=parse_fastllm(pre_prompt),
            user_role=parse_fastllm(user_role),
            bot_role=parse_fastllm(bot_role),
            history_sep=parse_fastllm(history_sep),
            **extra,
        )

    @property
    def has_fixed_ids(self) -> bool:
        """True if rendering needs a tokenizer to turn fixed token ids into text."""
        return any(isinstance(p, TokenId) for name in _PIECE_FIELDS for p in getattr(self, name))

    def with_(self, **changes: Any) -> ChatFormat:
        """A copy with some fields changed (e.g. another ``default_system``).

        Args:
            **changes: Field names and their new values.

        Returns:
            The changed copy (this format is immutable).
        """
        return replace(self, **changes)


# A rendered prompt before tokenization: text runs and fixed token ids, in order.
Part = str | int


def render_format_parts(
    fmt: ChatFormat,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str,
    eos_token: str,
) -> list[Part]:
    """Lay out ``messages`` in ``fmt``: adjacent text merged, fixed token ids as ints."""
    msgs = validate_messages(messages, FORMAT_ROLES)
    system = fmt.default_system
    if msgs[0]["role"] == "system":
        system = msgs[0]["content"]
        msgs = msgs[1:]
    for i, m in enumerate(msgs):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] == "system":
            raise ChatTemplateError(
                "a named chat format takes at most one system message, and only as the first"
            )
        if m["role"] != expected:
            raise ChatTemplateError(
                f"chat turns must alternate user/assistant starting with user; message "
                f"{i + (len(messages) - len(msgs))} is {m['role']!r} where {expected!r} belongs"
            )
    if not msgs:
        raise ChatTemplateError("the conversation has no user message")

    out = _PartBuilder(bos_token, eos_token)

    def text(s: str) -> str:
        return s.strip() if fmt.strip_content else s

    f = {name: _normalised(getattr(fmt, name)) for name in _PIECE_FIELDS}
    system_block: tuple[Piece, ...] = ()
    if system is not None:
        system_block = (*f["system_prefix"], text(system), *f["system_suffix"])

    out.add(f["pre_prompt"])
    if not fmt.system_in_first_user:
        out.add(system_block)
    for i, m in enumerate(msgs):
        last = i == len(msgs) - 1
        if m["role"] == "user":
            out.add(f["user_role"])
            if i == 0 and fmt.system_in_first_user:
                out.add(system_block)
            out.add((text(m["content"]), *f["user_suffix"]))
            if not last or add_generation_prompt:
                out.add(f["bot_role"])
        else:
            sep = f["history_sep"]
            if last:
                # A BOS closing the separator opens the next turn; there is none.
                while sep and sep[-1] == BOS:
                    sep = sep[:-1]
            out.add((*f["reply_prefix"], text(m["content"]), *sep))
            if last and add_generation_prompt:
                out.add(f["bot_role"])  # as Jinja templates do: open another reply
    return out.parts


def _normalised(value: PieceLike) -> tuple[Piece, ...]:
    # ChatFormat.__post_init__ already turned every piece field into a tuple of pieces; this
    # only narrows the declared (constructor-friendly) type.
    return value if isinstance(value, tuple) else _pieces(value, "field")


class _PartBuilder:
    def __init__(self, bos: str, eos: str) -> None:
        self._special = {"bos": bos, "eos": eos}
        self.parts: list[Part] = []

    def add(self, pieces: Iterable[Piece]) -> None:
        for p in pieces:
            if isinstance(p, TokenId):
                self.parts.append(p.id)
                continue
            s = self._special[p.which] if isinstance(p, SpecialToken) else p
            if not s:
                continue
            if self.parts and isinstance(self.parts[-1], str):
                self.parts[-1] += s
            else:
                self.parts.append(s)


# ---------------------------------------------------------------------------------------------
# Built-in formats
# ---------------------------------------------------------------------------------------------

_LLAMA_SYS_PREFIX = "<<SYS>>\n"
_LLAMA_SYS_SUFFIX = "\n<</SYS>>\n\n"
_INSTRUCTION_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)

_LLAMA2 = ChatFormat(
    # Meta's reference: "<s>[INST] {user} [/INST] {reply} </s><s>[INST] ..." with the system
    # prompt wrapped in <<SYS>> inside the first [INST]; every message stripped.
    user_role=(BOS, "[INST] "),
    user_suffix=" [/INST]",
    reply_prefix=" ",
    history_sep=(" ", EOS),
    system_prefix=_LLAMA_SYS_PREFIX,
    system_suffix=_LLAMA_SYS_SUFFIX,
    system_in_first_user=True,
    strip_content=True,
    bos_token="<s>",
    eos_token="</s>",
    stop=("</s>",),
    description="Llama 2 chat / CodeLlama Instruct, system prompt in <<SYS>>",
)

_CHATML = ChatFormat(
    system_prefix="<|im_start|>system\n",
    system_suffix="<|im_end|>\n",
    user_role="<|im_start|>user\n",
    user_suffix="<|im_end|>\n",
    bot_role="<|im_start|>assistant\n",
    history_sep="<|im_end|>\n",
    stop=("<|im_end|>",),
    description="ChatML (Qwen, Yi, SmolLM, OpenHermes, ...)",
)

BUILTIN_FORMATS: dict[str, ChatFormat] = {
    "llama-2": _LLAMA2,
    "llama-2-nosys": _LLAMA2.with_(
        # Models trained without <<SYS>>: the system text opens the first instruction instead.
        system_prefix=(),
        system_suffix="\n",
        description="Llama 2 layout for models without <<SYS>> support",
    ),
    "llama-3": ChatFormat(
        pre_prompt=BOS,
        system_prefix="<|start_header_id|>system<|end_header_id|>\n\n",
        system_suffix="<|eot_id|>",
        user_role="<|start_header_id|>user<|end_header_id|>\n\n",
        user_suffix="<|eot_id|>",
        bot_role="<|start_header_id|>assistant<|end_header_id|>\n\n",
        history_sep="<|eot_id|>",
        strip_content=True,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        stop=("<|eot_id|>", "<|end_of_text|>"),
        description="Llama 3 / 3.1 / 3.2 Instruct",
    ),
    "chatml": _CHATML,
    "mistral-instruct": ChatFormat(
        # Mistral-7B-Instruct v0.1/v0.2: no space before the reply, EOS right after it, no BOS
        # between turns. Mistral has no system role; its text opens the first instruction.
        pre_prompt=BOS,
        user_role="[INST] ",
        user_suffix=" [/INST]",
        history_sep=EOS,
        system_suffix="\n\n",
        system_in_first_user=True,
        bos_token="<s>",
        eos_token="</s>",
        stop=("</s>",),
        description="Mistral / Mixtral Instruct (v0.1, v0.2)",
    ),
    "vicuna": ChatFormat(
        # FastChat's vicuna_v1.1: "SYSTEM USER: q ASSISTANT: a</s>USER: ..."
        pre_prompt=BOS,
        default_system=(
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
        system_suffix=" ",
        user_role="USER: ",
        user_suffix=" ",
        bot_role="ASSISTANT:",
        reply_prefix=" ",
        history_sep=EOS,
        bos_token="<s>",
        eos_token="</s>",
        stop=("</s>", "USER:"),
        description="Vicuna v1.1 / v1.3 / v1.5",
    ),
    "alpaca": ChatFormat(
        # Stanford Alpaca's prompt; its training text was prompt + output + EOS with nothing
        # in between, so a finished reply follows "### Response:" directly.
        pre_prompt=BOS,
        default_system=_INSTRUCTION_PREAMBLE,
        system_suffix="\n\n",
        user_role="### Instruction:\n",
        user_suffix="\n\n",
        bot_role="### Response:",
        history_sep=EOS,
        bos_token="<s>",
        eos_token="</s>",
        stop=("</s>", "### Instruction:"),
        description="Stanford Alpaca instruction format",
    ),
    "wizardcoder": ChatFormat(
        pre_prompt=BOS,
        default_system=_INSTRUCTION_PREAMBLE,
        system_suffix="\n\n",
        user_role="### Instruction:\n",
        user_suffix="\n\n",
        bot_role="### Response:",
        history_sep="\n",
        bos_token="<s>",
        eos_token="</s>",
        stop=("</s>", "### Instruction:"),
        description="WizardCoder / WizardLM (Alpaca-style, newline between turns)",
    ),
    "deepseek-coder": ChatFormat(
        # deepseek-coder-instruct's own template: the default system prompt (note: it has no
        # final period) ends with a newline; turns are "### Instruction:\n" / "### Response:\n"
        # and a finished reply is closed by "\n<|EOT|>\n". A caller's system prompt gets the same
        # newline (the published template omits it, gluing the text to "### Instruction:").
        pre_prompt=BOS,
        default_system=(
            "You are an AI programming assistant, utilizing the Deepseek Coder model, developed "
            "by Deepseek Company, and you only answer questions related to computer science. "
            "For politically sensitive questions, security and privacy issues, and other "
            "non-computer science questions, you will refuse to answer"
        ),
        system_suffix="\n",
        user_role="### Instruction:\n",
        user_suffix="\n",
        bot_role="### Response:\n",
        history_sep="\n<|EOT|>\n",
        bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<|EOT|>",
        stop=("<|EOT|>",),
        description="DeepSeek Coder Instruct (1.3B / 6.7B / 33B, v1.5)",
    ),
    "internlm": ChatFormat(
        # InternLM-Chat v1: "<|User|>:q<eoh>\n<|Bot|>:a<eoa>\n", each earlier turn re-opened by BOS.
        pre_prompt=BOS,
        system_prefix="<|System|>:",
        system_suffix="\n",
        user_role="<|User|>:",
        user_suffix="<eoh>\n",
        bot_role="<|Bot|>:",
        history_sep=("<eoa>\n", BOS),
        bos_token="<s>",
        eos_token="</s>",
        stop=("<eoa>",),
        description="InternLM-Chat (7B, 7B v1.1, 20B)",
    ),
    "internlm2": _CHATML.with_(
        pre_prompt=BOS,
        bos_token="<s>",
        eos_token="</s>",
        description="InternLM2 / InternLM2.5 Chat (ChatML after BOS)",
    ),
    "xverse": ChatFormat(
        # XVERSE-Chat: "Human: q\n\nAssistant: a<|endoftext|>Human: ..."; a system prompt is
        # placed first, followed by a blank line.
        system_suffix="\n\n",
        user_role="Human: ",
        user_suffix="\n\n",
        bot_role="Assistant: ",
        history_sep=EOS,
        eos_token="<|endoftext|>",
        stop=("<|endoftext|>", "Human:"),
        description="XVERSE-Chat (7B, 13B, 65B)",
    ),
    "billa": ChatFormat(
        # BiLLa: "Human: q\nAssistant: a\n..." after a (usually empty) system line.
        pre_prompt=BOS,
        default_system="",
        system_suffix="\n",
        user_role="Human: ",
        user_suffix="\n",
        bot_role="Assistant: ",
        history_sep="\n",
        bos_token="<s>",
        eos_token="</s>",
        stop=("</s>", "\nHuman:"),
        description="BiLLa",
    ),
    "yulan": ChatFormat(
        pre_prompt=BOS,
        default_system=(
            "The following is a conversation between a human and an AI assistant namely YuLan, "
            "developed by GSAI, Renmin University of China. The AI assistant gives helpful, "
            "detailed, and polite answers to the user's questions."
        ),
        system_suffix="\n",
        user_role="[|Human|]:",
        user_suffix="\n",
        bot_role="[|AI|]:",
        history_sep="\n",
        bos_token="<s>",
        eos_token="</s>",
        stop=("</s>", "[|Human|]"),
        description="YuLan-Chat",
    ),
    "chinese-alpaca-2": _LLAMA2.with_(
        default_system="You are a helpful assistant. 你是一个乐于助人的助手。",
        description="Chinese-LLaMA-Alpaca-2 (Llama 2 layout, bilingual default system prompt)",
    ),
    "zephyr": ChatFormat(
        pre_prompt=BOS,
        system_prefix="<|system|>\n",
        system_suffix=(EOS, "\n"),
        user_role="<|user|>\n",
        user_suffix=(EOS, "\n"),
        bot_role="<|assistant|>\n",
        history_sep=(EOS, "\n"),
        bos_token="<s>",
        eos_token="</s>",
        stop=("</s>",),
        description="Zephyr (HuggingFaceH4/zephyr-7b-beta and derivatives)",
    ),
}

# Other spellings people (and llama.cpp) use for the same layouts.
ALIASES: dict[str, str] = {
    "llama2": "llama-2",
    "llama-2-chat": "llama-2",
    "llama2-sys": "llama-2",
    "llama3": "llama-3",
    "mistral": "mistral-instruct",
    "qwen": "chatml",
    "yi": "chatml",
    "smollm": "chatml",
    "deepseek": "deepseek-coder",
    "chinese-alpaca2": "chinese-alpaca-2",
}

_registry: dict[str, ChatFormat] = dict(BUILTIN_FORMATS)


def register_format(name: str, fmt: ChatFormat, *, overwrite: bool = False) -> None:
    """Make ``fmt`` available under ``name`` to :func:`render`, :func:`stop_strings`, ...

    Args:
        name: The new name.
        fmt: The format.
        overwrite: Replace a format already registered under ``name`` instead of raising
            ChatTemplateError.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ChatTemplateError(f"format name must be a non-empty str without padding: {name!r}")
    if not isinstance(fmt, ChatFormat):
        raise ChatTemplateError(f"register_format needs a ChatFormat, not {type(fmt).__name__}")
    if not overwrite and (name in _registry or name in ALIASES):
        raise ChatTemplateError(f"chat format {name!r} already exists (pass overwrite=True)")
    _registry[name] = fmt


def get_format(name: str) -> ChatFormat:
    """The registered format called ``name`` (aliases such as ``llama2`` accepted).

    Args:
        name: A format name or an alias.

    Returns:
        The format.

    Raises:
        ChatTemplateError: No format has that name (the message lists the names).
    """
    fmt = _registry.get(name) or _registry.get(ALIASES.get(name, ""))
    if fmt is None:
        raise ChatTemplateError(
            f"unknown chat format {name!r}; known formats: {', '.join(list_formats())}"
        )
    return fmt


def is_format_name(name: str) -> bool:
    return name in _registry or name in ALIASES


def list_formats() -> list[str]:
    """Names of all registered formats (built-in and user-registered), sorted.

    Returns:
        The format names.
    """
    return sorted(_registry)


# ---------------------------------------------------------------------------------------------
# Recognising a GGUF template
# ---------------------------------------------------------------------------------------------

# (format, markers that must all occur) — the first match wins, so more specific entries come
# first. Markers are distinctive strings of each family's published templates.
_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("llama-3", ("<|start_header_id|>", "<|end_header_id|>")),
    ("internlm2", ("<|im_start|>", "bos_token")),
    ("chatml", ("<|im_start|>",)),
    ("chinese-alpaca-2", ("[INST]", "<<SYS>>", "你是一个乐于助人的助手")),
    ("llama-2", ("[INST]", "<<SYS>>")),
    ("mistral-instruct", ("[INST]",)),
    ("deepseek-coder", ("### Instruction:", "<|EOT|>")),
    ("zephyr", ("<|user|>", "<|assistant|>", "<|system|>")),
    ("internlm", ("<|User|>", "<|Bot|>")),
    ("yulan", ("[|Human|]", "[|AI|]")),
    ("vicuna", ("USER:", "ASSISTANT:")),
    ("xverse", ("Human: ", "\\n\\nAssistant: ")),
    ("billa", ("Human: ", "\\nAssistant: ")),
    ("alpaca", ("### Instruction", "### Response")),
)


def guess_format(template: str) -> str | None:
    """The built-in format a Jinja template (or format name) corresponds to, if recognisable.

    Used to find stop strings for templates read from GGUF files. Returns ``None`` for layouts
    it does not know (e.g. Gemma, Phi-3, Command-R).

    Args:
        template: A Jinja chat template or a format name.

    Returns:
        A built-in format name, or None.
    """
    if not isinstance(template, str):
        raise ChatTemplateError(f"guess_format needs a str, not {type(template).__name__}")
    if is_format_name(template):
        return ALIASES.get(template, template)
    # Templates spell a newline as "\n" inside a string literal; normalise real newlines to that.
    norm = template.replace("\n", "\\n")
    for name, markers in _SIGNATURES:
        if all(m in norm for m in markers):
            if name == "zephyr" and "<|end|>" in norm:
                return None  # Phi-3 uses the same role tags with its own <|end|> marker
            return name
    return None


__all__ = [
    "ALIASES",
    "BOS",
    "BUILTIN_FORMATS",
    "ChatFormat",
    "EOS",
    "Part",
    "Piece",
    "SpecialToken",
    "TokenId",
    "get_format",
    "guess_format",
    "is_format_name",
    "list_formats",
    "parse_fastllm",
    "register_format",
    "render_format_parts",
]
