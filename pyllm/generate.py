"""The decode loop: prompt -> tokens -> streamed text, with stop strings and stop tokens.

Per generated token the loop makes one forward call (``LLM.eval``) and one sampling call into
C++; everything else here is cheap bookkeeping. Stop strings are matched on the decoded text, so
they work across token boundaries; text that might be the start of a stop string is held back
until it is known not to be one, and a stop string itself is never emitted.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pyllm.errors import ContextError, PyllmError, SamplingError
from pyllm.model import common_prefix

if TYPE_CHECKING:
    from pyllm.model import LLM
    from pyllm.sampling import SamplingParams


# Test hook: with PYLLM_TEST_HOLD_AFTER=N the first generation of the process stops after N
# tokens, creates the file PYLLM_TEST_HOLD_FLAG (if set) and waits until interrupted (Ctrl-C),
# so a test can interrupt a reply mid-way on any machine, however fast it decodes. Unset
# (always, outside tests) it costs one comparison per token.
_HOLD_AFTER = int(os.environ.get("PYLLM_TEST_HOLD_AFTER", "0") or 0) or None
_held = threading.Event()


def _hold() -> None:
    _held.set()
    flag = os.environ.get("PYLLM_TEST_HOLD_FLAG")
    if flag:
        with open(flag, "w"):
            pass
    threading.Event().wait()  # until a signal (KeyboardInterrupt) ends the wait

UNTIL_DONE = -1  # max_tokens meaning "until an end token or a full context", as llama.cpp's -n


def resolve_max_tokens(max_tokens: int | None) -> int | None:
    """The one reading of a token limit (CLI ``-n``, Python ``max_tokens``, the server's field):
    None or -1 = until done (returned as None), 0 = generate nothing, N > 0 = at most N."""
    if max_tokens is None or (not isinstance(max_tokens, bool) and max_tokens == UNTIL_DONE):
        return None
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise SamplingError(f"max_tokens must be -1 (until done), 0 (nothing) or a positive "
                            f"count, got {max_tokens!r}")
    return max_tokens


class StopMatcher:
    """Finds the earliest stop string in a growing text and holds back possible stop prefixes."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self._buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; returns (text safe to emit, whether a stop string was reached)."""
        self._buf += text
        if not self.stops:
            out, self._buf = self._buf, ""
            return out, False
        hits = [i for i in (self._buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self._buf[: min(hits)]
            self._buf = ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self._buf)), hold, -1):
                if self._buf.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self._buf) - hold
        out, self._buf = self._buf[:cut], self._buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out


@dataclass
class TokenLogprob:
    token: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class Piece:
    """One step of a generation stream: the text it releases (may be empty) and its token."""

    text: str
    token: int | None
    logprob: TokenLogprob | None = None


class Generation:
    """Iterator of :class:`Piece` for one prompt. After exhaustion, ``finish_reason`` is
    ``"stop"`` (EOS / end-of-turn token or stop string) or ``"length"`` (max_tokens or n_ctx),
    and ``tokens`` holds every generated token id."""

    def __init__(self, llm: LLM, prompt_tokens: Sequence[int], params: SamplingParams,
                 max_tokens: int | None, stop: Sequence[str] = (),
                 stop_tokens: Iterable[int] = (), logprobs: int | None = None) -> None:
        from pyllm.sampling import Sampler

        max_tokens = resolve_max_tokens(max_tokens)
        if not prompt_tokens:
            raise PyllmError("the prompt is empty (no tokens)")
        if len(prompt_tokens) >= llm.n_ctx:
            raise ContextError(f"the prompt has {len(prompt_tokens)} tokens; the context holds "
                               f"{llm.n_ctx} (n_ctx), leaving no room to generate")
        self.llm = llm
        self.prompt_tokens = list(prompt_tokens)
        self.max_tokens = max_tokens
        self.sampler = Sampler(params, llm.n_vocab)
        self.stop_tokens = frozenset(stop_tokens)
        self.matcher = StopMatcher(stop)
        self.decoder = llm.tokenizer.decoder(skip_special=True)
        self.n_logprobs = logprobs
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        # seconds spent in the prompt forward / the per-token forward+sampling, for --verbose
        self.t_prompt = 0.0
        self.t_generate = 0.0
        self.n_prompt_evaluated = 0
        self._iter = self._run()

    def __iter__(self) -> Iterator[Piece]:
        return self._iter

    def __next__(self) -> Piece:
        return next(self._iter)

    def _logprob(self, logits: np.ndarray, token: int, text: str) -> TokenLogprob:
        x = logits.astype(np.float64)
        lse = np.log(np.exp(x - x.max()).sum()) + x.max()
        lp = x - lse
        top: list[tuple[int, str, float]] = []
        if self.n_logprobs:
            k = min(self.n_logprobs, lp.size)
            idx = np.argpartition(-lp, k - 1)[:k]
            idx = idx[np.argsort(-lp[idx])]
            tok = self.llm.tokenizer
            top = [(int(i), tok.token_to_piece(int(i)), float(lp[i])) for i in idx]
        return TokenLogprob(token, text, float(lp[token]), top)

    def _run(self) -> Iterator[Piece]:
        llm = self.llm
        # As llama.cpp: the prompt counts as history for the repetition penalties.
        self.sampler.accept_many(self.prompt_tokens)
        if self.max_tokens == 0:  # nothing asked for: no forward pass either
            self.finish_reason = "length"
            return
        t0 = time.perf_counter()
        before = llm.tokens
        logits = llm.eval_prompt(self.prompt_tokens)
        # eval_prompt reuses the cached prefix but always evaluates the last prompt token
        reused = min(common_prefix(before, self.prompt_tokens), len(self.prompt_tokens) - 1)
        self.n_prompt_evaluated = len(self.prompt_tokens) - reused
        self.t_prompt = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            yield from self._loop(logits)
        finally:
            self.t_generate = time.perf_counter() - t0

    def _loop(self, logits: np.ndarray) -> Iterator[Piece]:
        llm = self.llm
        while True:
            if self.max_tokens is not None and len(self.tokens) >= self.max_tokens:
                self.finish_reason = "length"
                break
            token = self.sampler.sample(logits)
            if token in self.stop_tokens:
                self.finish_reason = "stop"
                break
            self.sampler.accept(token)
            self.tokens.append(token)
            raw = self.decoder.feed(token)
            lp = self._logprob(logits, token, raw) if self.n_logprobs is not None else None
            text, stopped = self.matcher.push(raw)
            if stopped:
                if text:
                    yield Piece(text, token, lp)
                self.finish_reason = "stop"
                return
            yield Piece(text, token, lp)
            if _HOLD_AFTER is not None and len(self.tokens) == _HOLD_AFTER and not _held.is_set():
                _hold()
            if len(self.prompt_tokens) + len(self.tokens) >= llm.n_ctx:
                # prompt + output fill the context: stop rather than overrun it
                self.finish_reason = "length"
                break
            logits = llm.eval_token(token)
        rest, stopped = self.matcher.push(self.decoder.flush())
        rest += "" if stopped else self.matcher.flush()
        if rest:
            yield Piece(rest, None)


def stop_token_ids(llm: LLM) -> set[int]:
    """EOS and end-of-turn / end-of-generation tokens of the model's vocabulary."""
    tok = llm.tokenizer
    ids = set(tok.eot_ids)
    if tok.eos_id is not None and tok.eos_id >= 0:
        ids.add(tok.eos_id)
    return ids


def prompt_tokens(llm: LLM, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        # a text longer in bytes than n_ctx tokens could cover is refused before tokenizing
        return llm.tokenizer.encode(prompt, add_special=True, parse_special=False,
                                    max_tokens=llm.n_ctx)
    return [int(t) for t in prompt]


def chat_prompt(llm: LLM, messages: Sequence[dict[str, Any]],
                chat_format: str | None) -> tuple[list[int], list[str]]:
    """Render a conversation with the named format or the model's own template; returns the
    prompt tokens and the stop strings of that format."""
    from pyllm import chat

    tok = llm.tokenizer
    template = chat_format or llm.metadata.get("tokenizer.chat_template") or "llama-2"
    ids = chat.render_ids(list(messages), template, tok, add_generation_prompt=True)
    if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids.insert(0, tok.bos_id)
    return ids, chat.stop_strings(template)
