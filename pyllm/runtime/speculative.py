"""Speculative decoding: drafters that guess the next tokens cheaply, checked by the target
model in one batched forward (:class:`pyllm.runtime.generation.Generation` drives the rounds).

A round: the last produced token plus a draft of k tokens go through the target in one call,
which gives the logits after each of them; the sequence's own step machine then samples at each
position in turn, exactly as plain decoding would, and keeps the draft while the sampled token
equals the drafted one. The first token that differs is kept instead of the draft (it is the
target's sample), the rest of the draft is rolled back out of the KV cache, and when the whole
draft holds, the logits after its last token give one more token for free.

Drafts are deterministic (a prompt-lookup continuation, or the draft model's most probable
tokens), i.e. the draft distribution q puts all its mass on the drafted token. The standard
rejection rule (keep a draft token d with probability min(1, p(d) / q(d)), else sample from the
normalized max(0, p - q)) then reads: keep d with probability p(d), else sample from p without
d, which is exactly what "sample from p, keep d if the sample is d" does. So the output
distribution is the target's, whatever the sampler settings (penalties, grammars, mirostat
included), and with a fixed seed the output is the same token stream as without drafting
(the sampler draws once per produced token in both). Greedy output is identical to plain
decoding: a round is kept below the prefill kernels' token threshold, where the decode kernels
give every token's logits bit for bit as one-token calls do (tests/test_speculative.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pyllm.errors import SpeculativeError, TokenizerError

if TYPE_CHECKING:
    from pyllm.runtime.llm import LLM

# The defaults, shared by the Python API, the CLI and the server (llama.cpp's where it has one).
DEFAULT_DRAFT_MAX = 16  # tokens drafted per round at most
DEFAULT_DRAFT_MIN = 0  # a shorter draft is not used (plain decoding for that step)
DEFAULT_DRAFT_P_MIN = 0.75  # the draft model stops at a token it is less sure of
DEFAULT_NGRAM_MAX = 3  # prompt lookup: the longest suffix it looks for
DEFAULT_NGRAM_MIN = 2  # ... and the shortest (single tokens repeat too often to predict)
# Vocabularies may differ by a few added tokens (llama.cpp allows 128); the shared ids must agree.
MAX_VOCAB_DIFFERENCE = 128


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpeculativeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class Drafter(Protocol):
    """What :class:`~pyllm.runtime.generation.Generation` needs of a drafter."""

    draft_max: int
    draft_min: int

    def attach(self, target: LLM) -> None:
        """Check that the drafter can serve ``target`` (raises SpeculativeError)."""

    def draft(self, tokens: Sequence[int], n_max: int) -> list[int]:
        """Up to ``n_max`` tokens guessed to follow ``tokens`` (the prompt and the output so far,
        ending with the last produced token); may be empty."""


class NgramDrafter:
    """Prompt lookup (llama.cpp's ``--spec ngram`` family, llama-cpp-python's
    ``LlamaPromptLookupDecoding``): find the most recent earlier occurrence of the last n tokens
    in the prompt and output, n from ``ngram_max`` down to ``ngram_min``, and draft what followed
    it. No second model; it pays where the output copies its input (edits, quotes, code).

    Args:
        ngram_max: The longest n-gram looked up.
        ngram_min: The shortest n-gram looked up.
        draft_max: The most tokens drafted per round.
        draft_min: Fewer drafted tokens than this are not checked (the round decodes one
            token).
    """

    def __init__(self, ngram_max: int = DEFAULT_NGRAM_MAX, ngram_min: int = DEFAULT_NGRAM_MIN,
                 draft_max: int = DEFAULT_DRAFT_MAX, draft_min: int = DEFAULT_DRAFT_MIN) -> None:
        self.ngram_max = _count("ngram_max", ngram_max, 1)
        self.ngram_min = _count("ngram_min", ngram_min, 1)
        if self.ngram_min > self.ngram_max:
            raise SpeculativeError(f"ngram_min ({ngram_min}) is above ngram_max ({ngram_max})")
        self.draft_max = _count("draft_max", draft_max, 1)
        self.draft_min = _count("draft_min", draft_min, 0)
        self._tokens: list[int] = []
        # per n: n-gram -> start of its latest occurrence that has a continuation
        self._index: dict[int, dict[tuple[int, ...], int]] = {}

    def attach(self, target: LLM) -> None:
        """Check that the drafter can serve ``target``: prompt lookup serves any model.

        Args:
            target: The model whose output is drafted.
        """
        return None

    def _sync(self, tokens: Sequence[int]) -> None:
        # The context grows by appending within a generation; anything else (a new prompt)
        # rebuilds the index.
        n_old = len(self._tokens)
        if len(tokens) < n_old or list(tokens[:n_old]) != self._tokens:
            self._tokens, self._index, n_old = [], {}, 0
        self._tokens.extend(int(t) for t in tokens[n_old:])
        toks = self._tokens
        # the n-grams ending at position p have a continuation once p + 1 exists
        for p in range(max(n_old - 1, 0), len(toks) - 1):
            for n in range(self.ngram_min, self.ngram_max + 1):
                if p + 1 >= n:
                    self._index.setdefault(n, {})[tuple(toks[p + 1 - n:p + 1])] = p + 1 - n

    def draft(self, tokens: Sequence[int], n_max: int) -> list[int]:
        """The tokens that followed the latest earlier occurrence of the longest matching n-gram.

        Args:
            tokens: The prompt and the output so far, ending with the last produced token.
            n_max: The most tokens wanted.

        Returns:
            Up to ``min(n_max, draft_max)`` tokens; empty when no n-gram recurs.
        """
        self._sync(tokens)
        toks = self._tokens
        for n in range(min(self.ngram_max, len(toks)), self.ngram_min - 1, -1):
            start = self._index.get(n, {}).get(tuple(toks[-n:]))
            if start is not None:
                return toks[start + n:start + n + min(n_max, self.draft_max)]
        return []


class DraftModel:
    """A smaller model of the same vocabulary drafts (llama.cpp's ``--draft-model``): its most
    probable next tokens, while its probability stays >= ``p_min``. It keeps its own context in
    step with the target's output, reusing the common prefix each round.

    Args:
        model: The draft model's GGUF path, or a loaded LLM (then the caller closes it).
        draft_max: The most tokens drafted per round.
        draft_min: Fewer drafted tokens than this are not checked (the round decodes one
            token).
        p_min: Drafting stops at a token the draft model gives less probability than this.
        **llm_kwargs: Passed to :class:`pyllm.LLM` when ``model`` is a path.
    """

    def __init__(self, model: str | os.PathLike[str] | LLM, *,
                 draft_max: int = DEFAULT_DRAFT_MAX, draft_min: int = DEFAULT_DRAFT_MIN,
                 p_min: float = DEFAULT_DRAFT_P_MIN, **llm_kwargs: Any) -> None:
        from pyllm.runtime.llm import LLM

        self.draft_max = _count("draft_max", draft_max, 1)
        self.draft_min = _count("draft_min", draft_min, 0)
        if isinstance(p_min, bool) or not isinstance(p_min, (int, float)) or not 0 <= p_min <= 1:
            raise SpeculativeError(f"p_min must be a number in [0, 1], got {p_min!r}")
        self.p_min = float(p_min)
        self._owned = not isinstance(model, LLM)
        self.llm: LLM = LLM(model, **llm_kwargs) if self._owned else model  # type: ignore[arg-type]
        self._checked: LLM | None = None  # the target last found compatible

    def attach(self, target: LLM) -> None:
        """Check that the draft model can serve ``target``: the same vocabulary, a context at
        least as long.

        Args:
            target: The model whose output is drafted.

        Raises:
            SpeculativeError: The vocabularies differ or the draft model's context is smaller.
        """
        if self._checked is target:
            return
        check_compatible(target, self.llm)
        if self.llm.n_ctx < target.n_ctx:
            raise SpeculativeError(f"the draft model's context ({self.llm.n_ctx}) is smaller "
                                   f"than the target's ({target.n_ctx})")
        self._checked = target

    def draft(self, tokens: Sequence[int], n_max: int) -> list[int]:
        """The draft model's most probable continuation of ``tokens``, greedily.

        Args:
            tokens: The prompt and the output so far, ending with the last produced token.
            n_max: The most tokens wanted.

        Returns:
            Up to ``min(n_max, draft_max)`` tokens, ending before the first one below ``p_min``.
        """
        import numpy as np

        n_max = min(n_max, self.draft_max, self.llm.n_ctx - len(tokens))
        if n_max <= 0:
            return []
        logits = self.llm.eval_prompt(tokens)
        out: list[int] = []
        while True:
            x = logits.astype(np.float64)
            best = int(np.argmax(x))
            p = 1.0 / float(np.exp(x - x[best]).sum())  # softmax probability of the best
            if p < self.p_min:
                break
            out.append(best)
            if len(out) >= n_max:
                break
            logits = self.llm.eval_token(best)
        return out

    def close(self) -> None:
        """Free the draft model if this drafter loaded it (a given LLM is left to its owner).

        """
        if self._owned:
            self.llm.close()


def check_compatible(target: LLM, draft: LLM) -> None:
    """The draft model's tokens must mean the target's: the same tokenizer model, BOS / EOS and
    BOS policy, vocabulary sizes within MAX_VOCAB_DIFFERENCE and the same text for every id
    both have."""
    try:
        a, b = target.tokenizer, draft.tokenizer
    except TokenizerError as e:
        raise SpeculativeError(f"the draft model cannot draft for this model: one of them "
                               f"has no tokenizer ({e})") from None
    what = None
    if a.model != b.model:
        what = f"tokenizer models differ ({a.model} / {b.model})"
    elif (a.bos_id, a.eos_id, a.add_bos) != (b.bos_id, b.eos_id, b.add_bos):
        what = (f"BOS / EOS differ (target {a.bos_id} / {a.eos_id}, add_bos {a.add_bos}; draft "
                f"{b.bos_id} / {b.eos_id}, add_bos {b.add_bos})")
    elif abs(a.n_vocab - b.n_vocab) > MAX_VOCAB_DIFFERENCE:
        what = f"vocabulary sizes differ by more than {MAX_VOCAB_DIFFERENCE} ({a.n_vocab} / " \
               f"{b.n_vocab})"
    else:
        ta, tb = list(a.vocab.tokens), list(b.vocab.tokens)  # each decoded in one pass
        for i in range(min(len(ta), len(tb))):
            if ta[i] != tb[i]:
                what = f"token {i} differs ({ta[i]!r} / {tb[i]!r})"
                break
    if what is not None:
        raise SpeculativeError(f"the draft model cannot draft for this model: {what}")


__all__ = ["DEFAULT_DRAFT_MAX", "DEFAULT_DRAFT_MIN", "DEFAULT_DRAFT_P_MIN", "DEFAULT_NGRAM_MAX",
           "DEFAULT_NGRAM_MIN", "DraftModel", "Drafter", "NgramDrafter",
           "SpeculativeError", "check_compatible"]
