"""Byte-level BPE (``tokenizer.ggml.model == "gpt2"``): GPT-2 / Llama 3 / SmolLM / Qwen style.

Text is split into pre-tokens (``pretokenize.py``), each pre-token's UTF-8 bytes are spelled with
GPT-2's printable byte alphabet (byte 0x20 -> "Ġ", ...), and adjacent symbols are merged by merge
rank until no listed merge applies.  The merge order reproduces llama.cpp exactly: always the
lowest-rank pair, the leftmost one on ties, re-examining only the neighbours of each merge.

Encoding cost is dominated by the per-pre-token Python work, so results are cached per pre-token
string: English text repeats its words, and a cache hit is one dict lookup.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Iterable, Sequence
from itertools import chain, pairwise
from typing import Any

from pyllm._native import optional_core
from pyllm.formats.gguf.strings import StringArray
from pyllm.tokenizer.runmerge import merge_runs
from pyllm.tokenizer.vocab import Vocab


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table (bytes that print as themselves keep their
    Latin-1 character; the others are moved to U+0100 and up, in byte order)."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table: list[str] = [""] * 256
    moved = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + moved)
            moved += 1
    return table


BYTE_TO_CHAR: list[str] = _byte_alphabet()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
# str.translate table from a Latin-1 view of the UTF-8 bytes to the byte alphabet.
_LATIN1_TO_ALPHABET = {b: c for b, c in enumerate(BYTE_TO_CHAR)}

# Bound on the pre-token cache; past it the cache is dropped and refilled (cheap and simple,
# and a stream of unique pre-tokens cannot grow memory without limit).
_CACHE_LIMIT = 200_000
# Pre-tokens longer than this are encoded but not kept in the cache: a megabyte of letters is one
# pre-token, and holding it (and its ids) until the cache fills would keep that memory forever.
CACHE_WORD_LIMIT = 256
# Pre-tokens up to this many bytes merge with the list scan, longer ones with the run-length heap
# (the scan is quadratic, and one pre-token can be a megabyte of letters).
_SHORT = 48
_INF = 1 << 62


class PairTable(dict[int, int]):
    """``left * stride + right -> rank * stride + merged``; a pair that does not merge reads as
    -1 (``table[key]``, for :func:`merge_runs`) or None (``table.get(key)``)."""

    def __missing__(self, key: int) -> int:
        return -1


def _fast_pair_table() -> Any:
    """The extension's pair-table builder, or None (the tokenizer works without it)."""
    return optional_core("bpe_pair_table")


def _texts_arg(texts: Sequence[str]) -> Any:
    """What the extension's table builder reads texts from: a GGUF string array's location
    in the file, or a list."""
    if isinstance(texts, StringArray):
        return texts.location
    return texts if isinstance(texts, list) else list(texts)


def bytes_to_token_text(data: bytes) -> str:
    """Spell raw bytes in the byte alphabet, the form tokens and merges are stored in."""
    return data.decode("latin-1").translate(_LATIN1_TO_ALPHABET)


def token_text_to_bytes(text: str) -> bytes:
    """Inverse of :func:`bytes_to_token_text`.  Characters outside the alphabet (possible in
    hand-made vocabularies) are kept as their own UTF-8 bytes."""
    out = bytearray()
    for ch in text:
        b = CHAR_TO_BYTE.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


class BpeModel:
    """Encodes text with a byte-level BPE vocabulary (no special-token handling here).

    Merging runs on integer symbol ids rather than strings: each merge ``left right`` becomes
    ``pair key -> rank * stride + merged id`` with ``key = left id * stride + right id``, so a
    lookup hashes one int instead of building and hashing a new string.  Strings that occur in
    merges but are not tokens get ids past the vocabulary (``_extra``), which keeps the mapping
    between symbol texts and ids one to one -- the property the exactness argument needs.
    """

    def __init__(self, vocab: Vocab) -> None:
        assert vocab.pre is not None
        self._pre = vocab.pre
        self._vocab = vocab  # its token_to_id is built on first use: rarely needed here
        self._ignore_merges = vocab.ignore_merges
        self._n_vocab = vocab.n_vocab
        self._cache: dict[str, tuple[int, ...]] = {}
        # Heap entries popped while merging long pre-tokens, summed over calls: the merge work,
        # which tests read to check it grows linearly with the input.
        self.merge_steps = [0]
        # The extension's table (_core.BpePairs: the same keys and values, a fraction of a
        # dict's memory, and the short merge in C++), or this module's own PairTable.
        self._pairs: Any
        self._merge_fast: Any = None
        fast, built = _fast_pair_table(), None
        if fast is not None:
            # a file's string arrays are read from its bytes: no str is made for any merge
            built = fast(_texts_arg(vocab.tokens), _texts_arg(vocab.merge_texts), BYTE_TO_CHAR)
        if built is not None:
            self._pairs, byte_id, extra_texts, self._stride = built
            self._byte_id: list[int] = byte_id
            self._extra = dict(enumerate(extra_texts, start=vocab.n_vocab))
            self._merge_fast = self._pairs.merge_short
        else:
            self._pairs = PairTable()
            self._build_pairs(vocab)

    def _build_pairs(self, vocab: Vocab) -> None:
        """The pair table in Python (what the extension's ``bpe_pair_table`` builds faster);
        raises the vocabulary's error for a merge that is not "left right"."""
        extra: dict[str, int] = {}

        def intern(text: str) -> int:
            tid = vocab.token_to_id.get(text)
            if tid is None:
                tid = extra.setdefault(text, vocab.n_vocab + len(extra))
            return tid

        def ids(texts: Iterable[str]) -> list[int]:
            # C-level lookups first; strings that are not tokens (rare) get interned.
            found = list(map(vocab.token_to_id.get, texts))
            if None in found:
                found = [intern(t) if i is None else i for t, i in zip(texts, found, strict=True)]
            return found  # type: ignore[return-value]

        self._byte_id = [intern(c) for c in BYTE_TO_CHAR]
        lefts = list(map(operator.itemgetter(0), vocab.merges))
        rights = list(map(operator.itemgetter(1), vocab.merges))
        left_ids, right_ids = ids(lefts), ids(rights)
        merged_ids = ids(list(map(operator.add, lefts, rights)))
        # Ids stay below the stride even after interning; leave room for every merge result.
        stride = vocab.n_vocab + len(extra) + 1
        keys = [a * stride + b for a, b in zip(left_ids, right_ids, strict=True)]
        values = [rank * stride + m for rank, m in enumerate(merged_ids)]
        # A pair listed twice keeps its first (lowest) rank: build from the end so it wins.
        self._pairs.update(zip(reversed(keys), reversed(values), strict=True))
        self._stride = stride
        self._extra = {i: t for t, i in extra.items()}

    def encode(self, text: str, out: list[int]) -> None:
        """Append the ids of ``text`` (one raw-text fragment) to ``out``."""
        cache = self._cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        words = self._pre.split(text)
        long_words = []
        for word in set(words):
            if word not in cache:
                cache[word] = self._encode_word(word)
                if len(word) > CACHE_WORD_LIMIT:
                    long_words.append(word)
        # Concatenate the cached ids at C speed (no Python-level loop per pre-token).
        out.extend(chain.from_iterable(map(cache.__getitem__, words)))
        for word in long_words:
            del cache[word]

    def _encode_word(self, word: str) -> tuple[int, ...]:
        raw = word.encode("utf-8")
        if self._ignore_merges:
            whole = self._vocab.token_to_id.get(bytes_to_token_text(raw))
            if whole is not None:
                return (whole,)
        byte_id = self._byte_id
        if len(raw) > _SHORT:
            sym = merge_runs(
                map(byte_id.__getitem__, raw),
                len(raw),
                self._pairs,
                self._stride,
                self.merge_steps,
            )
        elif self._merge_fast is not None:
            sym = self._merge_fast(raw, self.merge_steps)
        else:
            sym = [byte_id[b] for b in raw]
            if len(sym) > 1:
                self._merge_short(sym)
        if max(sym) < self._n_vocab:
            return tuple(sym)
        return tuple(self._with_fallback(sym))

    def _merge_short(self, sym: list[int]) -> None:
        """:meth:`_merge_heap` for short pre-tokens, in place: keep the rank of every adjacent
        pair in a list and merge at its minimum (``index`` finds the leftmost), re-ranking only
        the two pairs that touch the merged symbol.  Quadratic, but all of it runs in C-level list
        operations, which beats a heap for the few symbols of a word."""
        pairs, stride, inf = self._pairs, self._stride, _INF
        ranks = [pairs.get(a * stride + b, inf) for a, b in pairwise(sym)]
        first = len(ranks)
        while ranks:
            best = min(ranks)
            if best == inf:
                break
            i = ranks.index(best)
            merged = best % stride
            sym[i] = merged
            del sym[i + 1]
            del ranks[i]
            if i < len(ranks):
                ranks[i] = pairs.get(merged * stride + sym[i + 1], inf)
            if i:
                ranks[i - 1] = pairs.get(sym[i - 1] * stride + merged, inf)
        # Work for the tests' linearity checks: the list elements the min() scans visited.
        merges = first - len(ranks)
        self.merge_steps[0] += merges * (2 * first - merges + 1) // 2

    def _merge_heap(self, sym: list[int]) -> list[int]:
        """Apply merges to one pre-token's symbol ids; returns the final ids in order.

        The plain algorithm, one heap entry per symbol: what :func:`merge_runs` reproduces with
        less work, kept as the reference the tests compare it with.  Always the lowest-rank
        adjacent pair next, the leftmost on ties (llama.cpp's order).  Heap entries are not
        removed when a neighbour changes; an entry whose two positions no longer hold the ids it
        was made for is stale and skipped.
        """
        pairs, stride = self._pairs, self._stride
        n = len(sym)
        nxt = [*range(1, n), -1]
        prv = list(range(-1, n - 1))
        heap: list[tuple[int, int, int, int, int]] = []
        for i in range(n - 1):
            hit = pairs.get(sym[i] * stride + sym[i + 1])
            if hit is not None:
                heap.append((hit, i, i + 1, sym[i], sym[i + 1]))
        if not heap:
            return sym
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            hit, left, right, a, b = pop(heap)
            self.merge_steps[0] += 1
            if sym[left] != a or sym[right] != b:
                continue
            merged = hit % stride
            sym[left] = merged
            sym[right] = -1
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prv[after] = left
                c = sym[after]
                hit = pairs.get(merged * stride + c)
                if hit is not None:
                    push(heap, (hit, left, after, merged, c))
            before = prv[left]
            if before >= 0:
                c = sym[before]
                hit = pairs.get(c * stride + merged)
                if hit is not None:
                    push(heap, (hit, before, left, c, merged))
        return [s for s in sym if s >= 0]

    def _with_fallback(self, sym: list[int]) -> list[int]:
        token_to_id = self._vocab.token_to_id
        ids: list[int] = []
        for s in sym:
            if s < self._n_vocab:
                ids.append(s)
                continue
            # A symbol that is not a token (a merge result missing from the vocabulary, or an
            # alphabet character the vocabulary lacks): llama.cpp then looks each of its UTF-8
            # bytes up as a one-character token, which can only succeed for ASCII.  Anything
            # else is dropped, as there.
            for byte in self._extra[s].encode("utf-8"):
                if byte < 0x80:
                    tid = token_to_id.get(chr(byte))
                    if tid is not None:
                        ids.append(tid)
        return ids
