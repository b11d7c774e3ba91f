"""The single-sequence decode loop: prompt -> tokens -> streamed text, over one LLM's context.

Per generated token the loop makes one forward call (``LLM.eval_token``'s way, the logits as a
memoryview: no numpy on this path) and one step of
:class:`pyllm.runtime.steps.SequenceSteps` (the sampling call into C++, stop tokens, stop strings
matched on the decoded text across token boundaries with hold-back, limits, logprobs), the same step
machine the batching server drives. With a drafter (speculative decoding), a round is one forward
call of the last token plus a draft and one step per position while the draft holds
(:mod:`pyllm.runtime.speculative`). Also here: the prompt of a text or a conversation.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pyllm.errors import ContextError, PyllmError
from pyllm.runtime.steps import (
    UNTIL_DONE,
    Released,
    SequenceSteps,
    StopMatcher,
    common_prefix,
    resolve_max_tokens,
)

if TYPE_CHECKING:
    import numpy as np

    from pyllm.runtime.grammar import Constraint
    from pyllm.runtime.llm import LLM
    from pyllm.runtime.sampling import SamplingParams
    from pyllm.runtime.speculative import Drafter
    from pyllm.tokenizer import Tokenizer

# StopMatcher, UNTIL_DONE and resolve_max_tokens live in pyllm.runtime.steps; imported from here
# too.
__all__ = ["UNTIL_DONE", "Generation", "Piece", "SpecStats", "StopMatcher", "TokenLogprob",
           "chat_prompt", "prompt_tokens", "resolve_max_tokens", "stop_token_ids"]


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


@dataclass
class TokenLogprob:
    token: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class SpecStats:
    """Speculative decoding's counts of one generation: verification rounds, tokens drafted and
    drafted tokens kept."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class Piece:
    """One step of a generation stream: the text it releases (may be empty) and its token."""

    text: str
    token: int | None
    logprob: TokenLogprob | None = None


class Generation:
    """Iterator of :class:`Piece` for one prompt, driving :class:`pyllm.runtime.steps.SequenceSteps`
    with one ``LLM.eval_token`` per step. After exhaustion, ``finish_reason`` is ``"stop"``
    (EOS / end-of-turn token or stop string) or ``"length"`` (max_tokens or n_ctx), and
    ``tokens`` holds every generated token id."""

    def __init__(self, llm: LLM, prompt_tokens: Sequence[int], params: SamplingParams,
                 max_tokens: int | None, stop: Sequence[str] = (),
                 stop_tokens: Iterable[int] = (), logprobs: int | None = None,
                 constraint: Constraint | None = None, keep_special: bool = False,
                 drafter: Drafter | None = None, context_shift: int | None = None) -> None:
        max_tokens = resolve_max_tokens(max_tokens)
        if not prompt_tokens:
            raise PyllmError("the prompt is empty (no tokens)")
        if len(prompt_tokens) >= llm.n_ctx:
            raise ContextError(f"the prompt has {len(prompt_tokens)} tokens; the context holds "
                               f"{llm.n_ctx} (n_ctx), leaving no room to generate")
        self.llm = llm
        self.prompt_tokens = list(prompt_tokens)
        self.max_tokens = max_tokens
        # context shift (llama.cpp's --context-shift with --keep): when the context is full,
        # the oldest half of what follows the first `context_shift` tokens is dropped
        self.n_keep = context_shift
        self.n_shifts = 0
        if context_shift is not None and (isinstance(context_shift, bool)
                                          or not isinstance(context_shift, int)
                                          or context_shift < 0):
            raise ContextError(f"context_shift must be the number of tokens to keep (>= 0), "
                               f"got {context_shift!r}")
        self.steps = SequenceSteps(llm.tokenizer, llm.n_vocab, self.prompt_tokens, params,
                                   max_tokens=max_tokens,
                                   n_ctx=None if context_shift is not None else llm.n_ctx,
                                   stop=stop,
                                   stop_tokens=stop_tokens, logprobs=logprobs,
                                   constraint=constraint, keep_special=keep_special)
        self.sampler = self.steps.sampler
        # speculative decoding (pyllm.runtime.speculative): drafts checked in batched forwards
        self.drafter = drafter
        self.spec = SpecStats()
        if drafter is not None:
            drafter.attach(llm)
        # seconds spent in the prompt forward / the per-token forward+sampling, for --verbose
        self.t_prompt = 0.0
        self.t_generate = 0.0
        self.n_prompt_evaluated = 0
        self._iter = self._run()

    @property
    def tokens(self) -> list[int]:
        return self.steps.tokens

    @property
    def finish_reason(self) -> str | None:
        return self.steps.finish_reason

    def __iter__(self) -> Iterator[Piece]:
        return self._iter

    def __next__(self) -> Piece:
        return next(self._iter)

    def _run(self) -> Iterator[Piece]:
        llm = self.llm
        if self.steps.done:  # nothing asked for: no forward pass either
            return
        t0 = time.perf_counter()
        before = llm.tokens
        logits = llm._prompt_logits(self.prompt_tokens)
        # eval_prompt reuses the cached prefix but always evaluates the last prompt token
        reused = min(common_prefix(before, self.prompt_tokens), len(self.prompt_tokens) - 1)
        self.n_prompt_evaluated = len(self.prompt_tokens) - reused
        self.t_prompt = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            yield from self._loop(logits)
        finally:
            self.t_generate = time.perf_counter() - t0

    def _step(self, logits: np.ndarray) -> Iterator[Piece]:
        """One token from ``logits``: the pieces it releases."""
        steps = self.steps
        for out in steps.advance(logits):
            # a token whose text was all stop string releases nothing here
            if out.text or (out.token is not None and not steps.stopped_by_string):
                yield Piece(out.text, out.token, self._logprob(out))
        if (_HOLD_AFTER is not None and len(steps.tokens) == _HOLD_AFTER
                and not _held.is_set() and not steps.stopped_by_string):
            _hold()

    def _loop(self, logits: np.ndarray) -> Iterator[Piece]:
        if self.drafter is not None:
            yield from self._loop_speculative(logits)
            return
        steps = self.steps
        while True:
            yield from self._step(logits)
            if steps.done:
                return
            if not self._room(1):
                yield from self._full()
                return
            logits = self.llm._token_logits(steps.tokens[-1])

    def _full(self) -> Iterator[Piece]:
        """The end at a full context that cannot be shifted."""
        for out in self.steps.finish("length"):
            yield Piece(out.text, out.token)

    def _room(self, n: int) -> bool:
        """Whether n more tokens fit in the context, shifting it when allowed (else the sequence
        ends with "length"; without a shift the step machine has ended it already)."""
        llm = self.llm
        if llm.n_past + n <= llm.n_ctx:
            return True
        if self.n_keep is None:
            return False
        n_past = llm.n_past
        keep = min(self.n_keep, n_past)
        n_discard = (n_past - keep) // 2
        if n_discard < 1 or n_past - n_discard + n > llm.n_ctx:
            return False  # nothing left to drop: the kept part fills the context
        llm.shift_context(keep, n_discard)
        self.n_shifts += 1
        return True

    def _loop_speculative(self, logits: np.ndarray) -> Iterator[Piece]:
        """Rounds of: the last token plus a draft through the target at once, then one step per
        position while the sampled token is the drafted one (see pyllm.runtime.speculative)."""
        from pyllm._native import load_core

        steps, llm, drafter = self.steps, self.llm, self.drafter
        assert drafter is not None
        core = load_core(PyllmError)
        # Draft length: the decode kernels stream the weights once per group of `group` tokens,
        # so a round of the last token + group - 1 drafted ones costs about one plain step, and
        # each further group one more. Start there; grow by a group while whole drafts are kept,
        # back to one group at the first rejection. A round stays below the prefill kernels'
        # threshold: the decode kernels give each token's logits bit for bit as a one-token call
        # does (the prefill kernels round differently), so greedy output is exactly plain
        # decoding's.
        group = int(core.MATVEC_TOKENS)
        k_cap = min(drafter.draft_max, int(core.matmat_min_tokens()) - 2)
        k = min(group - 1, k_cap)
        yield from self._step(logits)
        while not steps.done:
            last = steps.tokens[-1]
            # room: the context must hold the last token and the draft; more than the tokens
            # still allowed (the last one comes from the logits after the draft) is wasted
            if not self._room(1):
                yield from self._full()
                return
            n_max = min(k, llm.n_ctx - llm.n_past - 1)
            if steps.max_tokens is not None:
                n_max = min(n_max, steps.max_tokens - len(steps.tokens) - 1)
            draft = drafter.draft(self.prompt_tokens + steps.tokens, n_max) if n_max > 0 else []
            draft = draft[:max(n_max, 0)]
            if len(draft) < max(drafter.draft_min, 1):
                yield from self._step(llm.eval_token(last))
                continue
            base = llm.n_past
            rows = llm.eval_all([last, *draft])
            self.spec.rounds += 1
            self.spec.drafted += len(draft)
            for i in range(len(draft) + 1):
                yield from self._step(rows[i])
                if steps.done or i == len(draft) or steps.tokens[-1] != draft[i]:
                    break
                self.spec.accepted += 1
            # the cache keeps the last token and the draft tokens that were kept
            llm.truncate(base + 1 + i)
            k = min(k + group, k_cap) if i == len(draft) else min(group - 1, k_cap)

    def _logprob(self, out: Released) -> TokenLogprob | None:
        if out.logprob is None or out.token is None:
            return None
        piece = self.llm.tokenizer.token_to_piece
        return TokenLogprob(out.token, out.raw, out.logprob.logprob,
                            [(t, piece(t), lp) for t, lp in out.logprob.top_logprobs])


def stop_token_ids(llm: LLM) -> set[int]:
    """EOS and end-of-turn / end-of-generation tokens of the model's vocabulary."""
    tok = llm.tokenizer
    ids = set(tok.eot_ids)
    if tok.eos_id is not None and tok.eos_id >= 0:
        ids.add(tok.eos_id)
    return ids


class PromptTarget(Protocol):
    """What turning a text or a conversation into prompt tokens needs: an :class:`LLM`, or the
    server's batching engine (whose slots have their own context size)."""

    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def chat_template(self) -> str | None: ...


def prompt_tokens(llm: PromptTarget, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        # a text longer in bytes than n_ctx tokens could cover is refused before tokenizing
        return llm.tokenizer.encode(prompt, add_special=True, parse_special=False,
                                    max_tokens=llm.n_ctx)
    return [int(t) for t in prompt]


def chat_prompt(llm: PromptTarget, messages: Sequence[Mapping[str, Any]],
                chat_format: str | None, tools: Sequence[Mapping[str, Any]] | None = None
                ) -> tuple[list[int], list[str]]:
    """Render a conversation with the named format or the model's own template (``tools``:
    the template's ``tools`` variable); returns the prompt tokens and the stop strings of that
    format."""
    from pyllm import chat

    tok = llm.tokenizer
    template = chat_format or llm.chat_template or "llama-2"
    extra: dict[str, Any] = {} if tools is None else {"tools": tools}
    ids = chat.render_ids(list(messages), template, tok, add_generation_prompt=True, **extra)
    if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids.insert(0, tok.bos_id)
    return ids, chat.stop_strings(template)
