"""A chat that outlives its context: the conversation as one running token stream, shifted when
full (llama.cpp's interactive mode with ``--context-shift``; ``pyllm chat --context-shift``).

Without a shift a chat re-renders the whole conversation each turn and the KV cache reuses the
common prefix; once the conversation is longer than the context that prompt no longer fits. Here
each turn appends only its own tokens to what the cache holds: the text the template adds after
the previous reply (the end of the assistant's turn) and the new user turn with the generation
prompt, found by rendering the conversation before and after and taking the difference. When
the cache is full (before a turn, or during a reply: the generation's own ``context_shift``) the
oldest half of what follows the kept tokens is dropped and the cache moved
(:meth:`pyllm.runtime.llm.LLM.shift_context`), so the model keeps the beginning (the system
prompt, with ``keep``) and the recent turns.

A template that is not prefix-stable (a turn's rendering is not the previous rendering plus the
turn), a reply cut by a stop string or by the user: the next turn falls back to a full
re-render, which must fit the context.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from pyllm.errors import ContextError

if TYPE_CHECKING:
    from pyllm.runtime.llm import LLM


class Conversation:
    """Turns of a chat over one :class:`~pyllm.runtime.llm.LLM` with context shifts.

    ``keep``: tokens at the start of the first prompt the shifts never drop (None: the whole
    first prompt, i.e. the system prompt and the first user turn). Sampling keywords as
    :meth:`LLM.chat`."""

    def __init__(self, llm: LLM, messages: Sequence[dict[str, Any]] = (), *,
                 chat_format: str | None = None, keep: int | None = None) -> None:
        self.llm = llm
        self.messages: list[dict[str, Any]] = list(messages)
        self.chat_format = chat_format
        self.keep_arg = keep
        self.keep = 0
        self.n_shifts = 0
        self._rendered: str | None = None  # the conversation as the cache holds it, as text
        self._pending: list[int] = []  # tokens after llm.tokens that belong to the conversation

    def _template(self) -> Any:
        return self.chat_format or self.llm.chat_template or "llama-2"

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        from pyllm import chat

        tok = self.llm.tokenizer
        return chat.render(messages, self._template(), tokenizer=tok,
                           add_generation_prompt=generation_prompt,
                           bos_token=tok.id_to_token(tok.bos_id) if tok.bos_id is not None
                           else None,
                           eos_token=tok.id_to_token(tok.eos_id) if tok.eos_id is not None
                           else None)

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.llm.tokenizer.encode(text, add_special=False,
                                                          parse_special=True)]

    def say(self, content: str, max_tokens: int | None = None, **sampling: Any) -> Iterator[str]:
        """The reply to one more user message, streamed; the reply joins the conversation when
        the stream is exhausted (an interrupted reply joins with what was streamed)."""
        from pyllm import chat
        from pyllm.runtime.completions import make_generation
        from pyllm.runtime.generation import chat_prompt

        llm = self.llm
        messages = [*self.messages, {"role": "user", "content": content}]
        head = self._render(messages, True)
        if self._rendered is not None and head.startswith(self._rendered):
            turn = self._pending + self._encode(head[len(self._rendered):])
            self._make_room(len(turn) + 1)
            tokens = llm.tokens + turn
        else:  # the first turn, or the fallback: the whole conversation, which must fit
            tokens, _ = chat_prompt(llm, messages, self.chat_format)
            llm.reset()
            self.keep = len(tokens) if self.keep_arg is None else min(self.keep_arg, len(tokens))
        gen = make_generation(llm, tokens, max_tokens=max_tokens, stop=sampling.pop("stop", None),
                              extra_stop=chat.stop_strings(self._template()),
                              context_shift=self.keep, **sampling)
        shown: list[str] = []
        complete = False
        try:
            for piece in gen:
                if piece.text:
                    shown.append(piece.text)
                    yield piece.text
            complete = True
        finally:
            self.n_shifts += gen.n_shifts
            reply = "".join(shown)
            self.messages = [*messages, {"role": "assistant", "content": reply}]
            self._after(head, reply, gen.tokens if complete and not gen.steps.stopped_by_string
                        else None)

    def _after(self, head: str, reply: str, tokens: list[int] | None) -> None:
        """What the next turn appends: the reply's last token (sampled, never fed) and the text
        the template puts after the reply; or a full re-render next time."""
        self._rendered, self._pending = None, []
        if tokens is None:
            return
        full = self._render(self.messages, False)
        if not full.startswith(head) or not full[len(head):].startswith(reply):
            return
        self._rendered = full
        self._pending = tokens[-1:] + self._encode(full[len(head) + len(reply):])

    def _make_room(self, n: int) -> None:
        llm = self.llm
        while llm.n_past + n > llm.n_ctx:
            n_discard = (llm.n_past - self.keep) // 2
            if n_discard < 1:
                raise ContextError(f"the turn needs {n} tokens and the {self.keep} kept ones "
                                   f"fill the context (n_ctx {llm.n_ctx}): keep fewer tokens")
            llm.shift_context(self.keep, n_discard)
            self.n_shifts += 1

    def reset(self, messages: Sequence[dict[str, Any]] = ()) -> None:
        self.messages = list(messages)
        self._rendered, self._pending = None, []
        self.llm.reset()


__all__ = ["Conversation"]
