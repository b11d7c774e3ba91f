"""The step machine of one generated sequence: logits in, released text and an end out.

Both consumers of a model's logits drive the same :class:`SequenceSteps`: the single-sequence
API (:class:`pyllm.runtime.generation.Generation`, one ``LLM.eval_token`` per step) and the batching
engine (:class:`pyllm.server.engine.Engine`, one row of a ``decode_batch`` per step). Neither
samples, matches stop strings, detokenizes, counts limits or computes logprobs itself, so a
change to what happens per token (constrained decoding masking the logits, speculative decoding
accepting several tokens) is made here, once.

Per step: sample a token (with logprobs when asked, from the sampler's one C++ entry; under a
grammar only from the tokens its :class:`~pyllm.runtime.grammar.Constraint` allows, and the
token then advances it); an end-of-generation token ends the sequence ("stop"), as does a
grammar that is complete and allows nothing more; otherwise the token enters the penalty
history and the stream decoder, and the text it completes passes the stop matcher, which holds
back what might be the start of a stop string and ends the sequence ("stop") when one appears.
The token limit and the context size end it with "length". At an end other than a stop string,
the text still held (an incomplete UTF-8 sequence, a possible stop prefix) is released.

This module imports no other runtime module (model, generate, completions, server), so any of
them may import it: it also holds the small helpers they share.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyllm.errors import PyllmError, SamplingError

if TYPE_CHECKING:
    from pyllm.runtime.grammar import Constraint
    from pyllm.runtime.sampling import SampleResult, SamplingParams

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


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences (the reusable KV entries)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


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


@dataclass(frozen=True)
class Released:
    """What one step releases: ``text`` safe to show (may be empty), the generated ``token``
    (None for the rest flushed at the end), ``raw`` the token's own decoded text before stop
    matching, and ``logprob`` when logprobs were asked for."""

    text: str
    token: int | None
    raw: str = ""
    logprob: SampleResult | None = None


class SequenceSteps:
    """The per-token state of one sequence: sampler (the prompt is its penalty history, as in
    llama.cpp), stop tokens, stop strings, stream decoder, token limit, context limit, logprobs,
    and the grammar's matcher when the output is constrained.

    ``finish_reason`` is None while running, then "stop" or "length"; ``stopped_by_string`` says
    that a stop string (not a token or a limit) ended it. ``tokens`` holds the generated ids.
    ``n_ctx`` None: no context limit (the caller shifts the context when it is full).
    """

    def __init__(self, tokenizer: Any, n_vocab: int, prompt: Sequence[int],
                 params: SamplingParams, *, max_tokens: int | None, n_ctx: int | None,
                 stop: Iterable[str] = (), stop_tokens: Iterable[int] = (),
                 logprobs: int | None = None, constraint: Constraint | None = None,
                 keep_special: bool = False) -> None:
        from pyllm.runtime.sampling import Sampler

        self.max_tokens = resolve_max_tokens(max_tokens)
        self.n_prompt = len(prompt)
        self.n_ctx = n_ctx
        self.sampler = Sampler(params, n_vocab)  # validates logit_bias against the vocabulary
        self.sampler.accept_many(prompt)
        self.stop_tokens = frozenset(stop_tokens)
        self.matcher = StopMatcher(stop)
        # control tokens are text only where a caller parses them (a tool-call marker)
        self.decoder = tokenizer.decoder(skip_special=not keep_special)
        self.n_logprobs = logprobs
        self.constraint = constraint
        self.tokens: list[int] = []
        self.stopped_by_string = False
        # nothing asked for: finished before any forward pass
        self.finish_reason: str | None = "length" if self.max_tokens == 0 else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def advance(self, logits: Any) -> list[Released]:
        """One step from the logits after the last token fed: what it releases (nothing, the
        token's text, and at the end the flushed rest). When :attr:`done` is False afterwards,
        the caller feeds ``tokens[-1]`` and calls again with the next logits."""
        if self.finish_reason is not None:
            raise PyllmError("this sequence has already finished")
        lp: SampleResult | None = None
        mask = self.constraint.mask() if self.constraint is not None else None
        if self.n_logprobs is not None:
            lp = self.sampler.sample_with_logprobs(logits, self.n_logprobs, mask)
            token = lp.token
        else:
            token = self.sampler.sample(logits, mask)
        if token in self.stop_tokens:  # under a grammar only allowed once it is complete
            return self._end("stop")
        if self.constraint is not None:
            self.constraint.accept(token)
        self.sampler.accept(token)
        self.tokens.append(token)
        raw = self.decoder.feed(token)
        text, stopped = self.matcher.push(raw)
        out = [Released(text, token, raw, lp)]
        if stopped:  # the stop string and anything after it are dropped: no flush
            self.finish_reason = "stop"
            self.stopped_by_string = True
            if self.constraint is not None:
                self.constraint.close()
        elif self.constraint is not None and self.constraint.finished:
            out += self._end("stop")  # nothing but an end token could follow: no forward for it
        elif self.max_tokens is not None and len(self.tokens) >= self.max_tokens:
            out += self._end("length")
        elif self.n_ctx is not None and self.n_prompt + len(self.tokens) >= self.n_ctx:
            out += self._end("length")  # prompt + output fill the context: never overrun it
        return out

    def finish(self, reason: str) -> list[Released]:
        """End the sequence from outside (a full context that cannot be shifted): the text
        still held is released."""
        if self.finish_reason is not None:
            return []
        return self._end(reason)

    def _end(self, reason: str) -> list[Released]:
        self.finish_reason = reason
        if self.constraint is not None:
            self.constraint.close()
        rest, stopped = self.matcher.push(self.decoder.flush())
        rest += "" if stopped else self.matcher.flush()
        return [Released(rest, None)] if rest else []
