"""Speculative decoding in the server: each running slot's draft for the next step
(``pyllm serve --spec ngram`` or ``--draft-model FILE``), which the engine feeds after the slot's
sampled token in the same ``decode_batch`` as every other slot's, then verifies per slot
(:meth:`pyllm.server.engine.Engine._verify`; the rule is pyllm.runtime.speculative's).

Prompt lookup: one :class:`~pyllm.runtime.speculative.NgramDrafter` per slot. A draft model: one
batched context of the small model with a sequence per slot, kept in step with each slot's
tokens (the longest common prefix is kept, the rest fed in one batched call for all slots),
then drafting greedily for all drafting slots at once, one batched call per drafted token,
while each slot's top probability stays >= p_min.

Drafts are at most one pass of the decode kernels over the weights per slot (``MATVEC_TOKENS`` -
1 tokens after the sampled one), within the step's budget, the slot's context and the tokens
the request may still produce.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from pyllm.errors import SpeculativeError
from pyllm.runtime.speculative import (
    DEFAULT_DRAFT_MAX,
    DEFAULT_DRAFT_MIN,
    DEFAULT_DRAFT_P_MIN,
    check_compatible,
)
from pyllm.runtime.steps import common_prefix

if TYPE_CHECKING:
    from pyllm.runtime.loaded import LoadedModel
    from pyllm.runtime.speculative import Drafter
    from pyllm.server.engine import Engine, _Slot


class Drafting:
    """The drafts of an engine's slots: ``factory`` makes each slot's drafter, or
    ``draft_model`` (a GGUF path or a LoadedModel of the same vocabulary) drafts for all."""

    def __init__(self, engine: Engine, group: int, *,
                 factory: Callable[[], Drafter] | None = None,
                 draft_model: str | os.PathLike[str] | LoadedModel | None = None,
                 draft_max: int = DEFAULT_DRAFT_MAX, draft_min: int = DEFAULT_DRAFT_MIN,
                 p_min: float = DEFAULT_DRAFT_P_MIN) -> None:
        from pyllm.runtime.loaded import LoadedModel

        if (factory is None) == (draft_model is None):
            raise SpeculativeError("give a drafter factory or a draft model, not both")
        self.engine = engine
        self.group = group
        self.draft_max, self.draft_min, self.p_min = draft_max, draft_min, p_min
        self._drafters = {s.id: factory() for s in engine._slots} if factory else {}
        self._owned = draft_model is not None and not isinstance(draft_model, LoadedModel)
        self.model: LoadedModel | None = None
        self._ctx: Any = None
        self._cached: dict[int, list[int]] = {}
        if draft_model is not None:
            self.model = (draft_model if isinstance(draft_model, LoadedModel)
                          else LoadedModel(draft_model, n_threads=engine.n_threads))
            try:
                check_compatible(engine.model, self.model)  # type: ignore[arg-type]
                self._ctx = self.model.new_context(engine.n_ctx, n_batch=engine.n_batch,
                                                   n_threads=engine.n_threads,
                                                   kv_type=engine.kv_type,
                                                   n_seq=engine.n_parallel)
            except BaseException:
                self.close()
                raise
            self._cached = {s.id: [] for s in engine._slots}

    def close(self) -> None:
        if self._owned and self.model is not None:
            self.model.close()
        self.model = None

    def _room(self, slot: _Slot, budget: int) -> int:
        job = slot.job
        assert job is not None
        steps = job.steps
        n_max = min(budget, self.engine.n_ctx - len(slot.cached) - 1, self.group - 1,
                    self.draft_max)
        if steps.max_tokens is not None:
            n_max = min(n_max, steps.max_tokens - len(steps.tokens) - 1)
        return n_max if n_max >= max(self.draft_min, 1) else 0

    def drafts(self, slots: list[_Slot], budget: int) -> dict[int, list[int]]:
        """Each running slot's draft (slot id -> tokens; empty: none), within ``budget`` tokens
        in all."""
        out: dict[int, list[int]] = {}
        rooms = {}
        for slot in slots:
            n = self._room(slot, budget)
            if n > 0:
                rooms[slot.id] = n
                budget -= n
        if self._ctx is not None:
            out = self._with_model([s for s in slots if s.id in rooms], rooms)
        else:
            for slot in slots:
                if slot.id in rooms and slot.job is not None:
                    seq = slot.job.req.prompt + slot.job.steps.tokens
                    out[slot.id] = self._drafters[slot.id].draft(seq, rooms[slot.id])
        return {k: v[:rooms[k]] for k, v in out.items()
                if len(v[:rooms[k]]) >= max(self.draft_min, 1)}

    def _with_model(self, slots: list[_Slot], rooms: dict[int, int]) -> dict[int, list[int]]:
        ctx, n_batch = self._ctx, self.engine.n_batch
        todo: dict[int, list[int]] = {}
        for slot in slots:  # bring each draft sequence in step with the slot's tokens
            assert slot.job is not None
            seq = slot.job.req.prompt + slot.job.steps.tokens
            cached = self._cached[slot.id]
            keep = min(common_prefix(cached, seq), len(seq) - 1)  # the last one gives logits
            if keep < len(cached):
                ctx.seq_truncate(slot.id, keep)
                del cached[keep:]
            todo[slot.id] = seq[keep:]
        drafts: dict[int, list[int]] = {s.id: [] for s in slots}
        active = [s.id for s in slots]
        while active:
            tokens: list[int] = []
            seqs: list[int] = []
            want: list[int] = []
            for sid in active:
                feed = todo[sid]
                tokens += feed
                seqs += [sid] * len(feed)
                want += [0] * (len(feed) - 1) + [1]
            rows = self._decode(tokens, seqs, want, n_batch)
            still = []
            for sid, row in zip(active, rows, strict=True):
                self._cached[sid] += todo[sid]
                x = row.astype(np.float64)
                best = int(np.argmax(x))
                p = 1.0 / float(np.exp(x - x[best]).sum())  # softmax probability of the best
                if p < self.p_min:
                    continue
                drafts[sid].append(best)
                if len(drafts[sid]) < rooms[sid]:
                    todo[sid] = [best]
                    still.append(sid)
            active = still
        return drafts

    def _decode(self, tokens: list[int], seqs: list[int], want: list[int],
                n_batch: int) -> list[np.ndarray]:
        """decode_batch in calls of at most n_batch tokens (a sequence catching up a long
        prompt); the rows of the tokens that want logits, in order."""
        rows: list[np.ndarray] = []
        for i in range(0, len(tokens), n_batch):
            out = self._ctx.decode_batch(np.asarray(tokens[i:i + n_batch], dtype=np.int32),
                                         np.asarray(seqs[i:i + n_batch], dtype=np.int32),
                                         np.asarray(want[i:i + n_batch], dtype=np.uint8))
            rows.extend(out)
        return rows


__all__ = ["Drafting"]
