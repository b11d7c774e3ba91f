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
    """Encodes text with a byte-level BPE vocabulary (no special-token handling here)."""

    def __init__(self, vocab: Vocab) -> None:
        assert vocab.pre is not None
        self._pre = vocab.pre
        self._ranks = vocab.merges
        self._token_to_id = vocab.token_to_id
        self._ignore_merges = vocab.ignore_merges
        self._cache: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str, out: list[int]) -> None:
        """Append the ids of ``text`` (one raw-text fragment) to ``out``."""
        cache = self._cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        for word in self._pre.split(text):
            ids = cache.get(word)
            if ids is None:
                ids = self._encode_word(bytes_to_token_text(word.encode("utf-8")))
                cache[word] = ids
            out.extend(ids)

    def _encode_word(self, word: str) -> tuple[int, ...]:
        token_to_id = self._token_to_id
        whole = token_to_id.get(word)
        if whole is not None and (self._ignore_merges or len(word) == 1):
            return (whole,)
        return tuple(self._ids_of(self._merge(list(word))))

    def _merge(self, sym: list[str]) -> list[str]:
        """Apply merges to the symbols of one pre-token; returns the final symbols in order."""
        ranks = self._ranks
        n = len(sym)
        nxt = [*range(1, n), -1]
        prv = list(range(-1, n - 1))
        heap: list[tuple[int, int, int, str]] = []
        for i in range(n - 1):
            rank = ranks.get((sym[i], sym[i + 1]))
            if rank is not None:
                heap.append((rank, i, i + 1, sym[i] + sym[i + 1]))
        heapq.heapify(heap)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            a, b = sym[left], sym[right]
            # Entries are never removed when a neighbour changes; an entry whose two symbols no
            # longer spell the pair it was made for is stale.
            if not a or not b or a + b != merged:
                continue
            sym[left] = merged
            sym[right] = ""
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prv[after] = left
            before = prv[left]
            if before >= 0:
                rank = ranks.get((sym[before], merged))
                if rank is not None:
                    heapq.heappush(heap, (rank, before, left, sym[before] + merged))
            if after >= 0:
                rank = ranks.get((merged, sym[after]))
                if rank is not None:
                    heapq.heappush(heap, (rank, left, after, merged + sym[after]))
        return [s for s in sym if s]

    def _ids_of(self, symbols: list[str]) -> list[int]:
        token_to_id = self._token_to_id
        ids: list[int] = []
        for s in symbols:
            tid = token_to_id.get(s)
            if tid is not None:
                ids.append(tid)
                continue
            # A symbol that is not a token can only be a single alphabet character missing from
            # the vocabulary; llama.cpp then looks each of its UTF-8 bytes up as a one-character
            # token, which can only succeed for ASCII.  Anything else is dropped, as there.
            for byte in s.encode("utf-8"):
                if byte < 0x80:
                    tid = token_to_id.get(chr(byte))
                    if tid is not None:
                        ids.append(tid)
        return ids
