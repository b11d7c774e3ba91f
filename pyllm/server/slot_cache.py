"""Slot caches outside the slots: state files (llama.cpp's ``--slot-save-path`` and its /slots
actions) and the host-memory LRU of reused slots' caches (``--cache-ram``).

Both run on the engine's scheduler thread, between two steps (the thread owns the batched
context), over one sequence's state (``Context.save_state(seq)`` / ``load_state(state, seq)``:
the K/V rows of that slot only). A slot's tokens (``_Slot.cached``) travel with its rows, so
the engine's prefix matching treats a restored cache like one the slot computed.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyllm.errors import ContextError
from pyllm.runtime.steps import common_prefix

if TYPE_CHECKING:
    from pyllm.server.engine import Engine, _Slot


def apply_slot_action(engine: Engine, slot: _Slot, action: str, path: Path | None
                      ) -> dict[str, Any]:
    """save / restore / erase one idle slot's cache (the /slots actions); llama.cpp's result
    fields."""
    from pyllm.runtime.llm import LLMState
    from pyllm.runtime.state_file import load_state_file, save_state_file

    t0 = time.perf_counter()
    ctx = engine._ctx
    if slot.job is not None or slot.embedding:
        raise ContextError(f"slot {slot.id} is busy")
    if action == "save":
        assert path is not None
        state = LLMState(tuple(slot.cached), bytes(ctx.save_state(slot.id)), None,
                         engine._lora_key(slot.lora))
        save_state_file(engine, path, state)
        result: dict[str, Any] = dict(id_slot=slot.id, filename=path.name,
                                      n_saved=len(slot.cached), n_written=path.stat().st_size)
    elif action == "restore":
        assert path is not None
        state = load_state_file(engine, path)
        if state.lora != engine._lora_key(slot.lora):
            raise ContextError(f"{path.name} was saved with other LoRA adapters")
        try:
            ctx.load_state(state.kv, slot.id)
        except ValueError as e:
            raise ContextError(f"cannot restore {path.name}: {e}") from None
        slot.cached = list(state.tokens)
        result = dict(id_slot=slot.id, filename=path.name, n_restored=len(slot.cached),
                      n_read=path.stat().st_size)
    else:
        n = len(slot.cached)
        ctx.seq_truncate(slot.id, 0)
        slot.cached.clear()
        result = dict(id_slot=slot.id, n_erased=n)
    result["timings"] = {"ms": 1000 * (time.perf_counter() - t0)}
    return result


class RamCache:
    """Reused slots' caches in host memory, least recently used first, bounded in bytes: a
    slot's cache is kept before a request overwrites it, and restored into the slot a later
    request gets when it shares a longer prefix with that request than any free slot."""

    MIN_TOKENS = 32  # shorter caches are cheaper to recompute than to keep

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0
        self.hits = 0
        # tokens -> (the slot's state, its LoRA mix)
        self._entries: collections.OrderedDict[tuple[int, ...],
                                               tuple[bytes, list[tuple[int, float]]]]
        self._entries = collections.OrderedDict()

    def keep(self, ctx: Any, slot: _Slot) -> None:
        """Keep the slot's cache (before it is overwritten)."""
        key = tuple(slot.cached)
        if not self.limit or len(key) < self.MIN_TOKENS or key in self._entries:
            return
        state = bytes(ctx.save_state(slot.id))
        if len(state) > self.limit:
            return
        self._entries[key] = (state, list(slot.lora))
        self.used += len(state)
        while self.used > self.limit:
            _, (old, _) = self._entries.popitem(last=False)
            self.used -= len(old)

    def restore(self, ctx: Any, slot: _Slot, prompt: list[int],
                mix: list[tuple[int, float]]) -> bool:
        """Put into the slot the kept cache sharing the longest prefix with the prompt, when it
        shares more than the slot itself (the slot's own cache is kept first)."""
        have = common_prefix(slot.cached, prompt) if slot.lora == mix else 0
        best, best_n = None, max(have, self.MIN_TOKENS - 1)
        for key, (_, kmix) in self._entries.items():
            n = common_prefix(key, prompt) if kmix == mix else 0
            if n > best_n:
                best, best_n = key, n
        if best is None:
            return False
        state, kmix = self._entries[best]
        self._entries.move_to_end(best)  # most recent: keeping the slot's cache next cannot
        self.keep(ctx, slot)             # evict it (and it has been read already)
        if slot.lora != kmix:
            ctx.seq_set_lora(slot.id, kmix)
            slot.lora = list(kmix)
        ctx.load_state(state, slot.id)
        slot.cached = list(best)
        self.hits += 1
        return True


__all__ = ["RamCache", "apply_slot_action"]
