"""The engine's forward calls: what one step feeds (:func:`plan_step`) and the calls in flight.

A step feeds every running slot's sampled token (and its draft), then prompt chunks in what is
left of ``n_batch``. With one process the forward has run when ``decode_batch`` returns, so a
step is planned, run and landed at once. Over an MPI pipeline (``PipelineContext.depth`` > 1)
the engine keeps up to ``depth`` steps of disjoint slots in flight: while the later ranks run
one, rank 0 runs the next (``PipelineContext.submit``), so the ranks work at the same time
instead of taking turns; a step's slots are then capped at their share (all active slots over
the depth) so that there is a next step to overlap with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pyllm.server.drafting import Drafting
    from pyllm.server.engine import _Slot


@dataclass
class Flight:
    """One step's forward: the tokens each slot fed, the slot of each logits row, and the
    forward itself (``wait()`` gives the logits)."""

    fed: list[tuple[_Slot, list[int]]]
    owners: list[_Slot]
    forward: Any
    t0: float
    slots: set[int] = field(default_factory=set)


class Ran:
    """A forward that has already run (one process): its logits."""

    def __init__(self, logits: np.ndarray) -> None:
        self.logits = logits

    def wait(self) -> np.ndarray:
        return self.logits


@dataclass
class StepPlan:
    tokens: list[int] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    want: list[int] = field(default_factory=list)
    owners: list[_Slot] = field(default_factory=list)  # slot of each logits row
    fed: list[tuple[_Slot, list[int]]] = field(default_factory=list)


def plan_step(slots: list[_Slot], flying: set[int], n_batch: int, depth: int,
              drafting: Drafting | None) -> StepPlan:
    """The next step over the slots not in flight: running slots first (one token each, never
    starved), their drafts in what the step has room for, then prompt chunks sharing the
    rest. With ``depth`` > 1 at most ceil(active slots / depth) slots join."""
    plan = StepPlan()
    active = [s for s in slots if s.job is not None and (s.next_token is not None or s.todo)]
    cap = len(active) if depth <= 1 else math.ceil(
        (len(active) + len(flying - {s.id for s in active})) / depth)
    ready = [s for s in active if s.id not in flying][:cap]
    budget = n_batch
    running = [s for s in ready if s.next_token is not None]
    budget -= len(running)
    drafts = drafting.drafts(running, budget) if drafting is not None else {}
    for slot in running:  # the sampled token and the draft, a logits row each
        slot.draft = drafts.get(slot.id, [])
        feed = [slot.next_token, *slot.draft]
        plan.tokens.extend(feed)
        plan.seqs.extend([slot.id] * len(feed))
        plan.want.extend([1] * len(feed))
        plan.owners.extend([slot] * len(feed))
        plan.fed.append((slot, feed))
        budget -= len(slot.draft)
    for slot in ready:  # prompt chunks share what is left of the step
        if slot.next_token is not None or not slot.todo or budget <= 0:
            continue
        chunk = slot.todo[:budget]
        last = len(chunk) == len(slot.todo)
        plan.tokens.extend(chunk)
        plan.seqs.extend([slot.id] * len(chunk))
        plan.want.extend([0] * (len(chunk) - 1) + [1 if last else 0])
        if last:
            plan.owners.append(slot)
        plan.fed.append((slot, chunk))
        budget -= len(chunk)
    return plan
