"""SentencePiece-style BPE (``tokenizer.ggml.model == "llama"``): LLaMA 1/2, Mistral, Yi, ...

The input fragment arrives with spaces already escaped as U+2581 ("▁") and the optional leading
space already added (``tokenizer.py`` does both, because whether to add it depends on the special
tokens around the fragment).  Starting from single characters, the adjacent pair whose
concatenation is the highest-scoring vocabulary token is merged (leftmost on ties), until no pair
forms a token.  Symbols that are not tokens fall back to ``<0xNN>`` byte tokens.

Speed: SentencePiece does not pre-split, so in principle one merge run covers the whole text.
But when no token contains a non-"▁" character followed by "▁" (true of every LLaMA-family
vocabulary -- pieces only *start* with "▁"), no merge can cross the point just before a "▁" that
follows another character, so the text can be cut there and each word-sized chunk merged on its
own -- with identical results, and cached like BPE pre-tokens.  Vocabularies without that
property are merged in one run.

The chunks not yet cached are merged by the ``sentencepiece`` library (C++), run on a model built
from this vocabulary, whenever its result provably equals the pure-Python merge below: its BPE
uses the same rule (highest score, leftmost on ties) and the same byte fallback, and differs only
in never producing unused pieces or merging into control/unknown/user-defined/byte pieces -- so
vocabularies with unused pieces, or with such a piece that two other pieces spell, stay on the
Python path.  ``tests/test_tokenizer.py`` checks both paths against each other.
"""

from __future__ import annotations

import heapq
import re
from itertools import chain, pairwise
from typing import Any

from pyllm.errors import TokenizerError
from pyllm.tokenizer.runmerge import merge_runs
from pyllm.tokenizer.vocab import TokenType, Vocab

SPACE = "\u2581"

_CHUNK = re.compile(f"{SPACE}*[^{SPACE}]+|{SPACE}+")
_CROSSES = re.compile(f"[^{SPACE}]{SPACE}")
_CACHE_LIMIT = 200_000
# Chunks longer than this are merged here (not by the library) and not kept in the cache: one
# chunk can be a megabyte of one letter, and the cache would hold it until it fills.
CACHE_WORD_LIMIT = 256
_SHORT = 48  # chunks up to this many characters use the list scan, longer ones merge_runs
_INF = float("inf")
_FLOAT_MAX = 1.7976931348623157e308
# Symbols of merge_runs: token ids, and ``_CHARS + code point`` for characters that are no token.
_CODE_POINTS = 0x110000
_PAIR_CACHE_LIMIT = 1_000_000


class _PairTable(dict[int, int]):
    """merge_runs' pair table for a SentencePiece vocabulary, filled on demand:
    ``left * stride + right -> rank * stride + token`` when the two texts joined are a token
    (rank: the token's place in best-score-first order, equal scores sharing one), else -1."""

    def __init__(self, model: SpmModel, stride: int) -> None:
        super().__init__()
        self._model = model
        self._stride = stride

    def __missing__(self, key: int) -> int:
        model = self._model
        left, right = divmod(key, self._stride)
        tid = model._token_to_id.get(model._symbol_text(left) + model._symbol_text(right))
        value = -1 if tid is None else model._ranks()[tid] * self._stride + tid
        if len(self) > _PAIR_CACHE_LIMIT:
            self.clear()
        self[key] = value
        return value


def _library_processor(vocab: Vocab) -> Any | None:
    """A ``sentencepiece`` processor that encodes chunks exactly as the Python merge does, or
    None when the library is missing or the vocabulary is one where the two could differ."""
    try:
        import sentencepiece
    except ImportError:
        return None
    tokens, types, token_to_id = vocab.tokens, vocab.types, vocab.token_to_id
    if any(t in (TokenType.UNUSED, TokenType.UNDEFINED) for t in types):
        return None
    if any(b is None for b in vocab.byte_to_id) or "unk" not in vocab.special_ids:
        return None
    for text, ttype in zip(tokens, types, strict=True):
        if ttype != TokenType.NORMAL and any(
            text[:k] in token_to_id and text[k:] in token_to_id for k in range(1, len(text))
        ):
            return None  # llama.cpp could merge into this piece, SentencePiece would not
    from pyllm.tokenizer.spm_proto import sentencepiece_model_from_vocab

    try:
        proto = sentencepiece_model_from_vocab(vocab, add_dummy_prefix=False)
        return sentencepiece.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, ValueError, OSError):
        return None


class SpmModel:
    """Encodes escaped text with a SentencePiece-style vocabulary.

    ``use_library=False`` forces the pure-Python merge (the reference the tests compare with).
    """

    def __init__(self, vocab: Vocab, use_library: bool = True) -> None:
        self._vocab = vocab
        self._use_library = use_library
        self._library: Any | None = None  # built on first need: costs ~0.1 s per 32k pieces
        self._token_to_id = vocab.token_to_id
        self._scores = vocab.scores
        self._byte_to_id = vocab.byte_to_id
        self._unk = vocab.special_ids.get("unk")
        self._chunked = not any(_CROSSES.search(t) for t in vocab.tokens)
        # A -inf score must stay distinguishable from the "no such token" sentinel.
        self._neg_scores = [min(-s, _FLOAT_MAX) for s in vocab.scores]
        self._cache: dict[str, tuple[int, ...]] = {}
        # For merge_runs, built on the first long chunk.
        self._stride = vocab.n_vocab + _CODE_POINTS
        self._rank: list[int] | None = None
        self._pairs: _PairTable | None = None
        # Heap entries popped while merging long chunks, summed over calls: the merge work,
        # which tests read to check it grows linearly with the input.
        self.merge_steps = [0]

    def encode(self, text: str, out: list[int]) -> None:
        """Append the ids of ``text`` (escaped, one raw-text fragment) to ``out``."""
        if not self._chunked:
            # One merge run over the whole fragment: in C++ when the library is exact here.
            library = self._get_library() if len(text) > 64 else None
            out.extend(library.encode(text) if library is not None else self._encode_chunk(text))
            return
        cache = self._cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        chunks = _CHUNK.findall(text)
        missing = [c for c in set(chunks) if c not in cache]
        long_chunks = [c for c in missing if len(c) > CACHE_WORD_LIMIT]
        if long_chunks:
            missing = [c for c in missing if len(c) <= CACHE_WORD_LIMIT]
            for chunk in long_chunks:
                cache[chunk] = self._encode_chunk(chunk)
        # Below a handful of chunks the library call costs more than it saves.
        library = self._get_library() if len(missing) > 8 else None
        if library is not None:
            for chunk, ids in zip(missing, library.encode(missing), strict=True):
                cache[chunk] = tuple(ids)
        else:
            for chunk in missing:
                cache[chunk] = self._encode_chunk(chunk)
        out.extend(chain.from_iterable(map(cache.__getitem__, chunks)))
        for chunk in long_chunks:
            del cache[chunk]

    def _get_library(self) -> Any | None:
        if self._library is None and self._use_library:
            self._library = _library_processor(self._vocab)
            self._use_library = self._library is not None
        return self._library

    def _merge_short(self, sym: list[str]) -> None:
        """The merge loop for short chunks, in place: the negated score of every adjacent pair
        lives in a list, the next merge is at its minimum (``index`` finds the leftmost), and
        only the two pairs touching the merged symbol are looked up again.  Quadratic, but in
        C-level list operations, which beats a heap for the few characters of a word."""
        token_to_id, neg, inf = self._token_to_id, self._neg_scores, _INF
        ranks = []
        for a, b in pairwise(sym):
            tid = token_to_id.get(a + b)
            ranks.append(inf if tid is None else neg[tid])
        first = len(ranks)
        while ranks:
            best = min(ranks)
            if best == inf:
                break
            i = ranks.index(best)
            merged = sym[i] + sym[i + 1]
            sym[i] = merged
            del sym[i + 1]
            del ranks[i]
            if i < len(ranks):
                tid = token_to_id.get(merged + sym[i + 1])
                ranks[i] = inf if tid is None else neg[tid]
            if i:
                tid = token_to_id.get(sym[i - 1] + merged)
                ranks[i - 1] = inf if tid is None else neg[tid]
        # Work for the tests' linearity checks: the list elements the min() scans visited.
        merges = first - len(ranks)
        self.merge_steps[0] += merges * (2 * first - merges + 1) // 2

    def _encode_chunk(self, text: str) -> tuple[int, ...]:
        token_to_id = self._token_to_id
        whole = token_to_id.get(text)
        if whole is not None and len(text) == 1:
            return (whole,)
        if len(text) <= _SHORT:
            sym = list(text)
            self._merge_short(sym)
            return self._ids_of(sym)
        token_to_id, chars = self._token_to_id, self._stride - _CODE_POINTS
        if self._pairs is None:
            self._pairs = _PairTable(self, self._stride)
        sym = merge_runs(
            (token_to_id.get(ch, chars + ord(ch)) for ch in text),
            len(text),
            self._pairs,
            self._stride,
            self.merge_steps,
        )
        if max(sym) < chars:
            return tuple(sym)
        ids: list[int] = []
        for s in sym:
            if s < chars:
                ids.append(s)
            else:  # a character that is no token: byte fallback
                ids.extend(self._byte_ids(chr(s - chars)))
        return tuple(ids)

    def _symbol_text(self, symbol: int) -> str:
        chars = self._stride - _CODE_POINTS
        return self._vocab.tokens[symbol] if symbol < chars else chr(symbol - chars)

    def _ranks(self) -> list[int]:
        """Each token's place in merge order: best score first, equal scores sharing a place."""
        if self._rank is None:
            order = {v: i for i, v in enumerate(sorted(set(self._scores), reverse=True))}
            self._rank = [order[v] for v in self._scores]
        return self._rank

    def _merge_heap(self, text: str) -> tuple[int, ...]:
        """The plain merge of a chunk, one heap entry per character: what :func:`merge_runs`
        reproduces with less work, kept as the reference the tests compare it with."""
        token_to_id = self._token_to_id
        scores = self._scores
        sym = list(text)
        n = len(sym)
        nxt = [*range(1, n), -1]
        prv = list(range(-1, n - 1))
        # Max-heap on score via negation; ties go to the leftmost pair.  The entry keeps the
        # pair's length so entries made stale by a neighbour's merge can be recognised.
        heap: list[tuple[float, int, int, int]] = []
        for i in range(n - 1):
            tid = token_to_id.get(sym[i] + sym[i + 1])
            if tid is not None:
                heap.append((-scores[tid], i, i + 1, 2))
        heapq.heapify(heap)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            self.merge_steps[0] += 1
            a, b = sym[left], sym[right]
            if not a or not b or len(a) + len(b) != size:
                continue
            merged = a + b
            sym[left] = merged
            sym[right] = ""
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prv[after] = left
            before = prv[left]
            if before >= 0:
                pair = sym[before] + merged
                tid = token_to_id.get(pair)
                if tid is not None:
                    heapq.heappush(heap, (-scores[tid], before, left, len(pair)))
            if after >= 0:
                pair = merged + sym[after]
                tid = token_to_id.get(pair)
                if tid is not None:
                    heapq.heappush(heap, (-scores[tid], left, after, len(pair)))
        return self._ids_of(sym)

    def _ids_of(self, sym: list[str]) -> tuple[int, ...]:
        token_to_id = self._token_to_id
        ids: list[int] = []
        for s in sym:
            if not s:
                continue
            tid = token_to_id.get(s)
            if tid is not None:
                ids.append(tid)
            else:
                # Only single characters can be left untokenized (merges always form tokens).
                ids.extend(self._byte_ids(s))
        return tuple(ids)

    def _byte_ids(self, s: str) -> list[int]:
        ids: list[int] = []
        for byte in s.encode("utf-8"):
            tid = self._byte_to_id[byte]
            if tid is None and byte < 0x80:
                tid = self._token_to_id.get(chr(byte))
            if tid is None:
                tid = self._unk
            if tid is None:
                raise TokenizerError(
                    f"cannot encode {s!r}: the vocabulary has no <0x{byte:02X}> byte token "
                    "and no unknown token"
                )
            ids.append(tid)
        return ids
