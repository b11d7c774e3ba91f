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
"""

from __future__ import annotations

import heapq
import re
from itertools import pairwise

from pyllm.errors import TokenizerError
from pyllm.tokenizer.vocab import Vocab

SPACE = "\u2581"

_CHUNK = re.compile(f"{SPACE}*[^{SPACE}]+|{SPACE}+")
_CROSSES = re.compile(f"[^{SPACE}]{SPACE}")
_CACHE_LIMIT = 200_000
_SHORT = 48  # chunks up to this many characters use the list scan, longer ones the heap
_INF = float("inf")


class SpmModel:
    """Encodes escaped text with a SentencePiece-style vocabulary."""

    def __init__(self, vocab: Vocab) -> None:
        self._token_to_id = vocab.token_to_id
        self._scores = vocab.scores
        self._byte_to_id = vocab.byte_to_id
        self._unk = vocab.special_ids.get("unk")
        self._chunked = not any(_CROSSES.search(t) for t in vocab.tokens)
        self._neg_scores = [-s for s in vocab.scores]
        self._cache: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str, out: list[int]) -> None:
        """Append the ids of ``text`` (escaped, one raw-text fragment) to ``out``."""
        if not self._chunked:
            out.extend(self._encode_chunk(text))
            return
        cache = self._cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        for chunk in _CHUNK.findall(text):
            ids = cache.get(chunk)
            if ids is None:
                ids = self._encode_chunk(chunk)
                cache[chunk] = ids
            out.extend(ids)

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
        while ranks:
            best = min(ranks)
            if best == inf:
                return
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

    def _encode_chunk(self, text: str) -> tuple[int, ...]:
        token_to_id = self._token_to_id
        whole = token_to_id.get(text)
        if whole is not None and len(text) == 1:
            return (whole,)
        if len(text) <= _SHORT:
            sym = list(text)
            self._merge_short(sym)
            return self._ids_of(sym)
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
