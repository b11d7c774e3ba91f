"""Run-length merging: the exact BPE/SPM merge order, on runs of equal symbols.

Both encoders merge adjacent symbols in one global order: the pair of lowest *rank* first (BPE:
merge-list index; SentencePiece: the resulting token's score, best first), the leftmost one on
ties.  The plain way (``_merge_heap`` in ``bpe.py`` / ``spm.py``) keeps one heap entry per symbol,
so ``" " * 10**6`` costs a million heap entries and merges.

Here the symbol sequence is kept as runs ``(symbol, count)`` (adjacent runs always hold different
symbols) and the heap holds, per run, its *internal* pair ``(s, s)`` -- of which the leftmost, at
the run's start, is the one the plain order would take first -- and the *boundary* pair between
the run's last symbol and the next run's first.  Popping from this heap yields the same pair the
plain heap would, with the same key ``(rank, offset of the left symbol)``, and a boundary merge or
a single internal merge changes the sequence exactly as the plain algorithm does.

The speed comes from *halving*: an internal pair ``(c, c)`` of rank ``r`` producing ``m`` lets
the whole run ``c * x`` become ``m * (x // 2)`` (+ one ``c`` if ``x`` is odd) in one step when
the pairs ``(m, m)``, ``(m, c)`` and ``(p, m)`` (``p``: the symbol before the run) each either do
not merge or rank strictly after ``r``.  Proof that this equals the plain order: the plain
algorithm takes the run's pairs leftmost first (positions 0-1, 2-3, ...; each merge makes the
overlapping pair to its right stale).  Until the run's last pair is merged, the only pairs these
merges create are those three (``(m, n)``, ``n`` the symbol after the run, appears only with the
last merge, when nothing of the run is left to disturb), and they rank after ``r``, so none of
them is taken before the remaining ``(c, c)`` pairs; pairs of rank below ``r`` elsewhere were all
taken before this pair was popped (it was the heap minimum), a boundary pair of rank ``r`` to the
left of the run has a smaller key and was taken first, and one to the right comes after every
internal pair in position order, exactly as here.  When the condition fails the run is merged
one pair at a time, which is the plain algorithm itself.  So a run of one character usually costs
O(log n) heap steps, and any text at most about one step per symbol, as before.

Offsets are measured in input units (bytes for BPE, characters for SentencePiece); a run is named
by the offset where it starts, which never changes while the run lives.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from itertools import groupby
from typing import Any, Protocol


class PairLookup(Protocol):
    """Maps ``left * stride + right`` to ``rank * stride + merged``, or -1 when the pair does
    not merge (a dict with ``__missing__``, or the extension's ``BpePairs``)."""

    def __getitem__(self, key: int, /) -> int: ...


def merge_runs(
    sym: Iterable[int],
    n: int,
    pairs: PairLookup,
    stride: int,
    counter: list[int],
) -> list[int]:
    """Merge ``sym`` (``n`` initial symbol ids, one unit each); return the final ids in order.

    ``pairs[key]`` must return -1 for a pair that does not merge.
    ``counter[0]`` is increased by the number of heap entries popped (the work done).
    """
    if n == 0:
        return []
    w = n + 1
    # Per run, keyed by its start offset: symbol, count (0 once the run is gone), next and
    # previous run (-1: none).  Dicts while runs are few (a megabyte of one letter is one run,
    # and four n-slot lists would cost 32 bytes per input byte); lists when most symbols are runs
    # of their own, where they are smaller and faster.
    rsym: Any = {}
    rcnt: Any = {}
    nxt: Any = {}
    prv: Any = {}
    size: dict[int, int] = {}  # units per symbol
    heap: list[int] = []
    pos = 0
    last = -1
    for s, group in groupby(sym):
        count = sum(1 for _ in group)
        rsym[pos], rcnt[pos], prv[pos], nxt[pos] = s, count, last, -1
        if last >= 0:
            nxt[last] = pos
        size[s] = 1
        last = pos
        pos += count
    if len(rcnt) > n // 8:
        rsym, rcnt, nxt, prv = (
            _as_list(d, w, fill) for d, fill in ((rsym, 0), (rcnt, 0), (nxt, -1), (prv, -1))
        )

    # Heap keys: ((rank * w + run start) * 2 + kind).  Kind 0 = boundary pair before the run
    # (its left symbol lies before the run start, so it sorts first), 1 = the run's internal pair.
    def rank_of(left: int, right: int) -> int:
        p = pairs[left * stride + right]
        return p // stride if p >= 0 else -1

    def halvable(c: int, m: int, before: int, rank: int) -> bool:
        """Whether every pair the run's merges create ranks after ``rank`` (see above)."""
        for left, right in ((m, m), (m, c), (rsym[before], m) if before >= 0 else (m, m)):
            r = rank_of(left, right)
            if 0 <= r <= rank:
                return False
        return True

    def push_internal(v: int) -> None:
        if rcnt[v] >= 2:
            c = rsym[v]
            p = pairs[c * stride + c]
            if p >= 0:
                heapq.heappush(heap, ((p // stride) * w + v) * 2 + 1)

    def push_boundary(v: int) -> None:
        u = prv[v]
        if u >= 0:
            p = pairs[rsym[u] * stride + rsym[v]]
            if p >= 0:
                heapq.heappush(heap, ((p // stride) * w + v) * 2)

    def unlink(v: int) -> None:
        a, b = prv[v], nxt[v]
        if a >= 0:
            nxt[a] = b
        if b >= 0:
            prv[b] = a
        rcnt[v] = 0

    def insert(u: int, b: int, v: int, s: int, count: int) -> None:
        """A new run at offset ``v`` between runs ``u`` and ``b`` (-1: none)."""
        rsym[v], rcnt[v] = s, count
        prv[v], nxt[v] = u, b
        if u >= 0:
            nxt[u] = v
        if b >= 0:
            prv[b] = v

    def settle(v: int) -> None:
        """Coalesce run ``v`` with equal neighbours and queue the pairs around it."""
        u = prv[v]
        if u >= 0 and rsym[u] == rsym[v]:
            rcnt[u] += rcnt[v]
            unlink(v)
            v = u
        b = nxt[v]
        if b >= 0 and rsym[b] == rsym[v]:
            rcnt[v] += rcnt[b]
            unlink(b)
        push_internal(v)
        push_boundary(v)
        b = nxt[v]
        if b >= 0:
            push_boundary(b)

    v = 0
    while v >= 0:
        push_internal(v)
        push_boundary(v)
        v = nxt[v]
    heapq.heapify(heap)

    steps = 0
    pop = heapq.heappop
    while heap:
        key = pop(heap)
        steps += 1
        kind = key & 1
        rank, v = divmod(key >> 1, w)
        if not rcnt[v]:
            continue  # the run is gone: stale
        if kind:
            c, x = rsym[v], rcnt[v]
            p = pairs[c * stride + c] if x >= 2 else -1
            if p < 0 or p // stride != rank:
                continue
            m = p % stride
            size[m] = 2 * size[c]
            if halvable(c, m, prv[v], rank):
                half, odd = divmod(x, 2)
                rsym[v], rcnt[v] = m, half
                if odd:
                    insert(v, nxt[v], v + half * size[m], c, 1)
                    settle(v + half * size[m])
            else:
                rsym[v], rcnt[v] = m, 1
                if x > 2:
                    insert(v, nxt[v], v + size[m], c, x - 2)
                    settle(v + size[m])
            settle(v)
        else:
            u = prv[v]
            if u < 0:
                continue
            a, b = rsym[u], rsym[v]
            p = pairs[a * stride + b]
            if p < 0 or p // stride != rank:
                continue
            m = p % stride
            sa, sb = size[a], size[b]
            size[m] = sa + sb
            start = v - sa
            y, after = rcnt[v], nxt[v]
            unlink(v)
            if rcnt[u] > 1:
                rcnt[u] -= 1  # loses its last symbol: no pair appears that was not there
                before = u
            else:
                before = prv[u]
                unlink(u)
            insert(before, after, start, m, 1)
            if y > 1:
                insert(start, after, v + sb, b, y - 1)
                settle(v + sb)
            settle(start)
    counter[0] += steps

    out: list[int] = []
    v = 0 if rcnt[0] else -1
    while v >= 0:
        out.extend([rsym[v]] * rcnt[v])
        v = nxt[v]
    return out


def _as_list(table: dict[int, int], size: int, fill: int) -> list[int]:
    out = [fill] * size
    for key, value in table.items():
        out[key] = value
    return out
