"""Perplexity and KL divergence of a model over a text, the way llama.cpp's perplexity tool counts.

The text is tokenized once (with BOS when the vocabulary adds one) and cut into non-overlapping
chunks of ``n_ctx`` tokens; a trailing partial chunk is dropped. Each chunk is evaluated from an
empty context, its first token replaced by BOS (when the model uses one). As llama.cpp does, only
the second half of each chunk is scored: the logits at positions ``n_ctx/2 .. n_ctx-2`` predict
the tokens that follow, so every scored token has at least ``n_ctx/2`` tokens of context and the
numbers are comparable with llama.cpp's for the same tokens and ``n_ctx``. PPL = exp(mean NLL);
its +/- is ``PPL * std(NLL) / sqrt(n - 1)`` (first-order error propagation, as llama.cpp prints).

KL divergence: :func:`save_kl_base` runs a (reference) model and stores, for every scored
position, the log-probabilities of its ``top_k`` most likely tokens, the probability mass of all
the others and the log-probability of the actual next token, plus the tokens and ``n_ctx``
(a ``.npz`` archive, written atomically, read back without pickle). :func:`kl_divergence` runs
another model over the same tokens and reports the mean KL(base || model), top-1 agreement and
the PPL ratio. KL is computed over the base's top-k tokens plus one bucket holding the rest of the
vocabulary; by the log-sum inequality this is a lower bound of the full-vocabulary KL, tight when
the tail is small (k = 64 keeps > 99 % of the mass on real text), and it is exactly 0 for a model
against its own base.
"""

from __future__ import annotations

import math
import os
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyllm.atomic import atomic_output
from pyllm.errors import PyllmError

KL_FORMAT = "pyllm-kl-base"
KL_VERSION = 1
DEFAULT_TOP_K = 64


class PerplexityError(PyllmError):
    """Bad perplexity input: too little text, a bad context size, a mismatched KL base file."""


@dataclass
class PerplexityResult:
    n_ctx: int
    n_chunks: int
    n_scored: int  # tokens scored
    ppl: float
    ppl_err: float
    running: list[float]  # PPL after each chunk
    seconds: float

    @property
    def mean_nll(self) -> float:
        return math.log(self.ppl)


@dataclass
class KLResult:
    n_ctx: int
    n_chunks: int
    n_scored: int
    ppl: float  # this model
    ppl_base: float
    ln_ratio: float  # mean ln(PPL / PPL_base) = mean NLL difference
    ln_ratio_err: float
    kl_mean: float
    kl_err: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1: float  # fraction of positions where both models' most likely token agree
    top1_err: float
    running_kl: list[float]
    seconds: float

    @property
    def ppl_ratio(self) -> float:
        return math.exp(self.ln_ratio)


# ---- chunking and scoring ------------------------------------------------------------------------


def tokenize_text(llm: Any, text: str) -> np.ndarray:
    """Tokens of the whole text, with BOS when the vocabulary adds it."""
    return np.asarray(llm.tokenize(text, add_special=True), dtype=np.int32)


def _check_ctx(n_ctx: int) -> None:
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 4:
        raise PerplexityError(f"the context size must be an integer >= 4, got {n_ctx!r}")


def _bos(llm: Any) -> int | None:
    try:
        tok = llm.tokenizer
    except PyllmError:
        return None
    return tok.bos_id if tok.add_bos else None


def _n_chunks(n_tokens: int, n_ctx: int) -> int:
    n = n_tokens // n_ctx
    if n == 0:
        raise PerplexityError(f"{n_tokens} tokens are fewer than one chunk of {n_ctx}; give more "
                              "text or a smaller context (-c)")
    return n


_ROWS = 64  # scored positions turned into float64 log-probs at a time (bounds the memory)


def _chunks(llm: Any, tokens: np.ndarray, n_ctx: int,
            n_chunks: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, bool]]:
    """(chunk, log-softmax of some scored positions (m, n_vocab), their next tokens (m,), whether
    this is the chunk's last block), over every scored position in order."""
    bos = _bos(llm)
    first = n_ctx // 2

    def chunks() -> Iterator[np.ndarray]:
        for c in range(n_chunks):
            chunk = np.array(tokens[c * n_ctx:(c + 1) * n_ctx], dtype=np.int32)
            if bos is not None:
                chunk[0] = bos
            yield chunk

    # over an MPI pipeline the next chunk runs on the first ranks while this one is scored
    for c, all_logits in enumerate(llm.logits_each(chunks())):
        logits = all_logits[first:n_ctx - 1]
        targets = np.asarray(tokens[c * n_ctx + first + 1:(c + 1) * n_ctx], dtype=np.int64)
        for r in range(0, targets.size, _ROWS):
            yield (c, _log_softmax(logits[r:r + _ROWS]), targets[r:r + _ROWS],
                   r + _ROWS >= targets.size)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _as_tokens(tokens: Sequence[int] | np.ndarray, n_vocab: int) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise PerplexityError("tokens must be a 1-D sequence of integers")
    if arr.size and (arr.min() < 0 or arr.max() >= n_vocab):
        raise PerplexityError(f"token ids must be in [0, {n_vocab})")
    return arr.astype(np.int32)


def _ppl_stats(nll: np.ndarray) -> tuple[float, float]:
    mean = float(nll.mean())
    ppl = math.exp(mean)
    if nll.size < 2:
        return ppl, float("nan")
    var = float((nll * nll).mean()) - mean * mean
    return ppl, ppl * math.sqrt(max(var, 0.0) / (nll.size - 1))


def perplexity(llm: Any, tokens: Sequence[int] | np.ndarray, n_ctx: int,
               on_chunk: Callable[[int, float], None] | None = None) -> PerplexityResult:
    """Perplexity of ``llm`` over ``tokens`` (see the module docstring for what is scored).

    ``llm`` needs ``n_ctx`` >= this ``n_ctx``. ``on_chunk(i, running_ppl)`` is called after each
    chunk.
    """
    _check_ctx(n_ctx)
    if llm.n_ctx < n_ctx:
        raise PerplexityError(f"the model was loaded with n_ctx={llm.n_ctx} < {n_ctx}")
    toks = _as_tokens(tokens, llm.n_vocab)
    n_chunks = _n_chunks(toks.size, n_ctx)
    t0 = time.perf_counter()
    nlls: list[np.ndarray] = []
    running: list[float] = []
    total = 0.0
    count = 0
    for c, logp, targets, last in _chunks(llm, toks, n_ctx, n_chunks):
        nll = -logp[np.arange(targets.size), targets]
        nlls.append(nll)
        total += float(nll.sum())
        count += nll.size
        if last:
            running.append(math.exp(total / count))
            if on_chunk is not None:
                on_chunk(c, running[-1])
    ppl, err = _ppl_stats(np.concatenate(nlls))
    return PerplexityResult(n_ctx, n_chunks, count, ppl, err, running, time.perf_counter() - t0)


# ---- KL divergence -------------------------------------------------------------------------------


@dataclass
class KLBase:
    """The saved reference distribution (see :func:`save_kl_base`)."""

    n_ctx: int
    n_vocab: int
    tokens: np.ndarray  # int32, every token of the text
    top_ids: np.ndarray  # int32 (n_scored, k), most likely first
    top_logp: np.ndarray  # float32 (n_scored, k)
    tail_p: np.ndarray  # float64 (n_scored,): probability of every other token
    tok_logp: np.ndarray  # float32 (n_scored,): log p of the actual next token
    model: str = ""

    @property
    def top_k(self) -> int:
        return int(self.top_ids.shape[1])

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KLBase:
        p = os.fspath(path)
        try:
            with np.load(p, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise PerplexityError(f"{p}: no such KL base file") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise PerplexityError(f"{p}: not a KL base file ({e})") from None
        try:
            if str(data["format"]) != KL_FORMAT:
                raise PerplexityError(f"{p}: not a {KL_FORMAT} file")
            if int(data["version"]) != KL_VERSION:
                raise PerplexityError(f"{p}: KL base version {int(data['version'])} is not "
                                      f"supported (expected {KL_VERSION})")
            base = cls(n_ctx=int(data["n_ctx"]), n_vocab=int(data["n_vocab"]),
                       tokens=np.asarray(data["tokens"], dtype=np.int32),
                       top_ids=np.asarray(data["top_ids"], dtype=np.int32),
                       top_logp=np.asarray(data["top_logp"], dtype=np.float32),
                       tail_p=np.asarray(data["tail_p"], dtype=np.float64),
                       tok_logp=np.asarray(data["tok_logp"], dtype=np.float32),
                       model=str(data.get("model", "")))
        except KeyError as e:
            raise PerplexityError(f"{p}: KL base file lacks {e}") from None
        except (TypeError, ValueError) as e:
            raise PerplexityError(f"{p}: malformed KL base file ({e})") from None
        base._validate(p)
        return base

    def _validate(self, where: str) -> None:
        if self.n_ctx < 4 or self.n_vocab < 1 or self.tokens.ndim != 1:
            raise PerplexityError(f"{where}: malformed KL base header")
        n_chunks = self.tokens.size // self.n_ctx
        n = n_chunks * (self.n_ctx - 1 - self.n_ctx // 2)
        k = self.top_ids.shape[1] if self.top_ids.ndim == 2 else -1
        if (n_chunks == 0 or self.top_ids.shape != (n, k) or k < 1 or k > self.n_vocab
                or self.top_logp.shape != (n, k) or self.tail_p.shape != (n,)
                or self.tok_logp.shape != (n,)):
            raise PerplexityError(f"{where}: KL base arrays do not match its tokens and n_ctx")
        if self.tokens.size and (self.tokens.min() < 0 or self.tokens.max() >= self.n_vocab):
            raise PerplexityError(f"{where}: KL base tokens are outside its vocabulary")
        if self.top_ids.min() < 0 or self.top_ids.max() >= self.n_vocab:
            raise PerplexityError(f"{where}: KL base token ids are outside its vocabulary")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (see :func:`pyllm.atomic.atomic_output`)."""
        with atomic_output(path, error=PerplexityError) as f:
            np.savez(f, format=np.array(KL_FORMAT), version=np.array(KL_VERSION),
                     n_ctx=np.array(self.n_ctx), n_vocab=np.array(self.n_vocab),
                     tokens=self.tokens, top_ids=self.top_ids, top_logp=self.top_logp,
                     tail_p=self.tail_p, tok_logp=self.tok_logp, model=np.array(self.model))


def _top_k(logp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids and log-probs of the k most likely tokens (most likely first) and the rest's mass."""
    rows = np.arange(logp.shape[0])[:, None]
    ids = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
    order = np.argsort(-logp[rows, ids], axis=-1, kind="stable")
    ids = ids[rows, order]
    p = np.exp(logp)
    p[rows, ids] = 0.0  # sum the tail directly: 1 - sum(top) would cancel badly
    return ids.astype(np.int32), logp[rows, ids].astype(np.float32), p.sum(axis=-1)


def save_kl_base(llm: Any, tokens: Sequence[int] | np.ndarray, n_ctx: int,
                 path: str | os.PathLike[str], top_k: int = DEFAULT_TOP_K,
                 on_chunk: Callable[[int, float], None] | None = None) -> PerplexityResult:
    """Run ``llm`` over ``tokens``, save its distributions to ``path`` and return its PPL."""
    _check_ctx(n_ctx)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= llm.n_vocab:
        raise PerplexityError(f"top_k must be in [1, {llm.n_vocab}], got {top_k!r}")
    if llm.n_ctx < n_ctx:
        raise PerplexityError(f"the model was loaded with n_ctx={llm.n_ctx} < {n_ctx}")
    toks = _as_tokens(tokens, llm.n_vocab)
    n_chunks = _n_chunks(toks.size, n_ctx)
    t0 = time.perf_counter()
    parts: list[tuple[np.ndarray, ...]] = []
    total, count = 0.0, 0
    running: list[float] = []
    for c, logp, targets, last in _chunks(llm, toks, n_ctx, n_chunks):
        tok = logp[np.arange(targets.size), targets]
        parts.append((*_top_k(logp, top_k), tok))
        total -= float(tok.sum())
        count += tok.size
        if last:
            running.append(math.exp(total / count))
            if on_chunk is not None:
                on_chunk(c, running[-1])
    ids, lp, tail, tok_lp = (np.concatenate(x) for x in zip(*parts, strict=True))
    base = KLBase(n_ctx=n_ctx, n_vocab=llm.n_vocab, tokens=toks[:n_chunks * n_ctx].copy(),
                  top_ids=ids, top_logp=lp, tail_p=tail, tok_logp=tok_lp.astype(np.float32),
                  model=str(getattr(llm, "model_path", "")))
    base.save(path)
    ppl, err = _ppl_stats(-tok_lp)
    return PerplexityResult(n_ctx, n_chunks, count, ppl, err, running, time.perf_counter() - t0)


def kl_divergence(llm: Any, base: KLBase, tokens: Sequence[int] | np.ndarray | None = None,
                  on_chunk: Callable[[int, float], None] | None = None) -> KLResult:
    """Compare ``llm`` with the saved ``base`` over the base's tokens.

    If ``tokens`` is given (e.g. the text tokenized by this model) it must equal the base's
    tokens; a model with another vocabulary size is refused too.
    """
    if llm.n_vocab != base.n_vocab:
        raise PerplexityError(f"the KL base has a vocabulary of {base.n_vocab} tokens, this model "
                              f"{llm.n_vocab}: not the same tokenizer")
    if tokens is not None:
        toks = _as_tokens(tokens, llm.n_vocab)[:base.tokens.size]
        if toks.size != base.tokens.size or not np.array_equal(toks, base.tokens):
            raise PerplexityError("the text's tokens differ from the KL base's (another text, "
                                  "tokenizer or context size?)")
    if llm.n_ctx < base.n_ctx:
        raise PerplexityError(f"the model was loaded with n_ctx={llm.n_ctx} < the base's "
                              f"{base.n_ctx}")
    n_ctx = base.n_ctx
    n_chunks = base.tokens.size // n_ctx
    t0 = time.perf_counter()
    kls: list[np.ndarray] = []
    nll_q: list[np.ndarray] = []
    agree: list[np.ndarray] = []
    running: list[float] = []
    pos = 0
    for c, logp, targets, last in _chunks(llm, base.tokens, n_ctx, n_chunks):
        s = slice(pos, pos + targets.size)
        pos += targets.size
        ids = base.top_ids[s]
        lp_b = base.top_logp[s].astype(np.float64)
        rows = np.arange(ids.shape[0])[:, None]
        lp_q = logp[rows, ids]
        kl = (np.exp(lp_b) * (lp_b - lp_q)).sum(axis=-1)
        q = np.exp(logp)
        q[rows, ids] = 0.0
        tail_q = np.maximum(q.sum(axis=-1), 1e-300)
        tail_b = base.tail_p[s]
        has_tail = tail_b > 0
        kl[has_tail] += tail_b[has_tail] * (np.log(tail_b[has_tail]) - np.log(tail_q[has_tail]))
        kls.append(np.maximum(kl, 0.0))  # >= 0 in exact arithmetic; float32 storage rounds
        nll_q.append(-logp[np.arange(targets.size), targets])
        agree.append(logp.argmax(axis=-1) == ids[:, 0])
        if last:
            running.append(float(np.concatenate(kls).mean()))
            if on_chunk is not None:
                on_chunk(c, running[-1])
    kl_all = np.concatenate(kls)
    nq = np.concatenate(nll_q)
    nb = -base.tok_logp.astype(np.float64)
    diff = nq - nb
    n = kl_all.size
    top1 = float(np.concatenate(agree).mean())

    def sem(x: np.ndarray) -> float:
        return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")

    return KLResult(
        n_ctx=n_ctx, n_chunks=n_chunks, n_scored=n,
        ppl=math.exp(float(nq.mean())), ppl_base=math.exp(float(nb.mean())),
        ln_ratio=float(diff.mean()), ln_ratio_err=sem(diff),
        kl_mean=float(kl_all.mean()), kl_err=sem(kl_all), kl_median=float(np.median(kl_all)),
        kl_p99=float(np.percentile(kl_all, 99)), kl_max=float(kl_all.max()),
        top1=top1, top1_err=math.sqrt(top1 * (1 - top1) / n) if n > 1 else float("nan"),
        running_kl=running, seconds=time.perf_counter() - t0)


__all__ = [
    "DEFAULT_TOP_K",
    "KLBase",
    "KLResult",
    "PerplexityError",
    "PerplexityResult",
    "kl_divergence",
    "perplexity",
    "save_kl_base",
    "tokenize_text",
]
