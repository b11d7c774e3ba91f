"""The batching engine: slots, the scheduler thread and continuous batching.

One ``_core.Context`` holds ``n_parallel`` independent KV regions (slots). A single scheduler
thread owns that context; every step it builds ONE ``decode_batch`` call out of

* the next token of every running sequence (one logits row each), and
* prompt chunks of newly admitted sequences (logits only for a prompt's last token),

so the weights are read once per step however many requests are in flight (pyllm/server/
flights.py: the plan, and the steps in flight at once over an MPI pipeline). New requests join
between steps; a cancelled one (client gone, server stopping) leaves its slot at the start of
the next step, also in the middle of its prompt, because prompts are fed in chunks.

Per request the engine drives the same step machine as :class:`pyllm.runtime.generation.Generation`,
:class:`pyllm.runtime.steps.SequenceSteps` (sampler with the prompt as penalty history, stop tokens,
stop strings with hold-back, ``max_tokens``, the context limit, logprobs), one logits row per step;
only the forward differs, because one ``decode_batch`` serves many sequences.

Embeddings (``submit_embedding``) run between two steps in a free slot, one per step, so
running generations are delayed by at most one embedding forward.

A finished slot keeps its KV entries: the next request is put in the free slot sharing the
longest prefix with its prompt and only the rest is evaluated (multi-turn chat re-sends the whole
conversation, so most of it is usually cached).

Results leave through the request's ``on_event`` callback, called on the scheduler thread; it
must be quick and must not raise (the HTTP layer hands events to its event loop).

``max_tokens`` follows llama.cpp's ``n_predict``: None or -1 = until an end-of-generation token or
until the slot's context is full, 0 = generate nothing (finish reason "length"), N = at most N.

Tests control the scheduler with :meth:`Engine.pause` / :meth:`Engine.resume` (hold it before
its next step, or let it take exactly N more steps) instead of relying on how fast a machine
decodes; unused, the hold costs one comparison per step.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pyllm.errors import ContextError, ModelError, PyllmError
from pyllm.runtime.footprint import DEFAULT_KV_TYPE
from pyllm.runtime.generation import stop_token_ids
from pyllm.runtime.grammar import Constraint, Grammar
from pyllm.runtime.loaded import (
    DEFAULT_N_BATCH,
    LoadedModel,
    check_count,
    clamp_batch,
    core_module,
)
from pyllm.runtime.lora import AdapterSet, lora_specs
from pyllm.runtime.speculative import DEFAULT_DRAFT_MAX, DEFAULT_DRAFT_P_MIN
from pyllm.runtime.steps import SequenceSteps, common_prefix, resolve_max_tokens
from pyllm.server.drafting import Drafting
from pyllm.server.flights import Flight, Ran, plan_step
from pyllm.server.slot_cache import RamCache, apply_slot_action

if TYPE_CHECKING:
    from pyllm.runtime.llm import LLM
    from pyllm.runtime.lora import LoraSpec
    from pyllm.runtime.sampling import SampleResult, SamplingParams
    from pyllm.runtime.speculative import Drafter


class QueueFullError(PyllmError):
    """Every slot is busy and the waiting queue is at its limit (HTTP 503)."""


class EngineStoppedError(PyllmError):
    """The engine is shutting down and takes no new work (HTTP 503)."""


# ---- events sent to a request's on_event callback ------------------------------------------


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it releases ('' while held back by the detokenizer or
    a possible stop string). ``logprob`` is set when the request asked for logprobs."""

    text: str
    token: int | None
    logprob: SampleResult | None = None


@dataclass(frozen=True)
class DoneEvent:
    """The request ended: ``finish_reason`` is "stop", "length" or "cancelled"."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ErrorEvent:
    message: str


Event = TokenEvent | DoneEvent | ErrorEvent


@dataclass
class Request:
    """What the engine needs for one generation. ``max_tokens`` None or -1 = until an
    end-of-generation token or the slot's context is full, 0 = nothing; ``logprobs`` None = off,
    else how many top alternatives to report per token."""

    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    max_tokens: int | None = None
    stop: Sequence[str] = ()
    logprobs: int | None = None
    grammar: Grammar | None = None  # constrained output (checked by the caller)
    keep_special: bool = False  # control tokens in the text (a tool-call marker is one)
    # LoRA adapters of this request, [(id, scale)] (unlisted ones: 0); None = the global scales
    lora: Sequence[tuple[int, float]] | None = None


class Handle:
    """Returned by :meth:`Engine.submit` / :meth:`Engine.submit_embedding`; :meth:`cancel`
    frees the slot within one step."""

    def __init__(self, job: _Job | _EmbedJob, engine: Engine) -> None:
        self._job = job
        self._engine = engine

    @property
    def id(self) -> int:
        return self._job.id

    def cancel(self) -> None:
        self._engine._cancel(self._job)


@dataclass
class _Job:
    id: int
    req: Request
    steps: SequenceSteps
    t_submit: float
    cancelled: bool = False
    done: bool = False


    @property
    def tokens(self) -> list[int]:
        return self.steps.tokens


@dataclass
class _EmbedJob:
    id: int
    tokens: list[int]
    on_done: Callable[[np.ndarray | None, str | None], None]
    cancelled: bool = False


@dataclass
class _Slot:
    id: int
    cached: list[int] = field(default_factory=list)  # tokens whose K/V the slot holds
    job: _Job | None = None
    embedding: bool = False  # lent to an embedding between two steps
    todo: list[int] = field(default_factory=list)  # prompt tokens not yet evaluated
    next_token: int | None = None  # sampled, to be fed in the next step
    lora: list[tuple[int, float]] = field(default_factory=list)  # the mix its cache was made with
    draft: list[int] = field(default_factory=list)  # fed after next_token in the current step


@dataclass
class EngineStats:
    requests_total: int = 0  # generations accepted (one per choice); embeddings are not counted
    requests_rejected: int = 0
    finished: dict[str, int] = field(default_factory=lambda: collections.Counter())
    prompt_tokens_total: int = 0  # prompt tokens in requests
    prompt_tokens_evaluated: int = 0  # of those, the ones not found in a slot's cache
    completion_tokens_total: int = 0
    embeddings_total: int = 0
    embedding_tokens_total: int = 0
    steps_total: int = 0
    step_seconds_total: float = 0.0
    cache_ram_hits: int = 0  # prompts that continued a cache restored from host memory
    cache_ram_bytes: int = 0  # host memory the kept caches take now
    draft_tokens_total: int = 0  # speculative decoding: tokens drafted
    draft_tokens_accepted: int = 0  # ... and the drafted tokens kept


class Engine:
    """Continuous batching over ``n_parallel`` slots of ``n_ctx`` tokens each.

    Thread-safe: :meth:`submit` and :meth:`Handle.cancel` may be called from any thread; all
    compute happens on the engine's own thread (the forward releases the GIL).
    """

    def __init__(self, model: LoadedModel | LLM, *, n_parallel: int = 4, n_ctx: int = 2048,
                 n_batch: int | None = None, n_threads: int | None = None,
                 kv_type: str = DEFAULT_KV_TYPE, max_queue: int = 64,
                 rate_window_s: float = 10.0, lora: Sequence[LoraSpec] | None = None,
                 drafter: Callable[[], Drafter] | None = None,
                 draft_model: str | os.PathLike[str] | LoadedModel | None = None,
                 draft_max: int = DEFAULT_DRAFT_MAX, draft_p_min: float = DEFAULT_DRAFT_P_MIN,
                 cache_ram_mib: int = 0) -> None:
        """``model`` is the loaded model the slots run (an :class:`pyllm.runtime.llm.LLM` gives its
        own, and its ``n_batch`` and thread count as defaults; its single-sequence context is
        not used). ``n_batch`` (default 512) and ``n_threads`` (default: the model's) are
        those of the batched context. ``lora``: adapters every slot applies
        (``["a.gguf", ("b.gguf", 0.5)]``). Speculative decoding (pyllm.server.drafting):
        ``drafter`` makes each slot's drafter (e.g. ``NgramDrafter``), or ``draft_model`` (a
        small model of the same vocabulary, ``draft_max`` / ``draft_p_min``) drafts for all;
        a running slot then feeds its sampled token and its draft in the same step as the
        others, and keeps the draft while its own samples equal it. ``cache_ram_mib``: host
        memory for the caches of slots about to be reused (LRU; 0: off): a request whose prompt
        shares a longer prefix with one of them than with any free slot gets it restored."""
        for name, value in (("n_parallel", n_parallel), ("n_ctx", n_ctx),
                            ("max_queue", max_queue)):
            check_count(name, value)
        if isinstance(model, LoadedModel):
            loaded = model
        else:  # an LLM: share its weights and take its settings as defaults
            loaded = model.model
            n_batch = n_batch or model.n_batch
            n_threads = n_threads or model.n_threads
        self.model = loaded
        self.n_parallel = n_parallel
        self.n_ctx = n_ctx
        self.kv_type = kv_type
        # tokens per step: running sequences take one each, prompt chunks share the rest (a
        # step never holds more than all slots' contexts); refused with the sizes if the
        # --parallel slots of -c positions cannot fit, before anything is allocated
        self._ctx = loaded.new_context(n_ctx, n_batch=n_batch or DEFAULT_N_BATCH,
                                       n_threads=n_threads, kv_type=kv_type, n_seq=n_parallel,
                                       stacklevel=3)
        # LoRA adapters loaded at start: ids 0..n-1 in the order given; their global scales
        # apply to requests without a `lora` field of their own (llama.cpp's /lora-adapters)
        adapters = AdapterSet(loaded)
        scales: dict[int, float] = {}
        for path, scale in lora_specs(lora):  # a file given twice is one adapter, scales added
            i = adapters.index(path)
            scales[i] = scales.get(i, 0.0) + scale
        self._lora_paths = [a.path for a in adapters.loaded]
        self._lora_scales = [scales.get(i, 0.0) for i in range(len(self._lora_paths))]
        if adapters.loaded:
            self._ctx.set_lora_adapters(adapters.cores())
        self.n_batch = clamp_batch(n_batch or DEFAULT_N_BATCH, n_ctx, n_parallel)
        self.n_threads = int(self._ctx.n_threads)
        self.max_queue = max_queue
        self.n_vocab = loaded.n_vocab
        self.tokenizer = loaded.tokenizer
        self.stop_ids = frozenset(stop_token_ids(loaded))
        self.stats = EngineStats()
        self._slots = [_Slot(i) for i in range(n_parallel)]
        if isinstance(cache_ram_mib, bool) or not isinstance(cache_ram_mib, int) or \
                cache_ram_mib < 0:
            raise ModelError(f"cache_ram_mib must be an integer >= 0, got {cache_ram_mib!r}")
        self._ram = RamCache(cache_ram_mib << 20)
        self._drafting: Drafting | None = None
        if drafter is not None or draft_model is not None:
            self._drafting = Drafting(self, int(core_module().MATVEC_TOKENS), factory=drafter,
                                      draft_model=draft_model, draft_max=draft_max,
                                      p_min=draft_p_min)
        # steps whose forwards are in flight (more than one only over an MPI pipeline, and not
        # with drafting, whose drafts follow each slot's cache step by step)
        self._depth = 1 if self._drafting else int(getattr(self._ctx, "depth", 1))
        self._flights: collections.deque[Flight] = collections.deque()
        self._pending: collections.deque[_Job] = collections.deque()
        self._embeds: collections.deque[_EmbedJob] = collections.deque()
        self._slot_ops: collections.deque[Callable[[], None]] = collections.deque()
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        # test hook (pause/resume): None = run freely; else how many more steps may start
        self._allowance: int | None = None
        self._held = threading.Event()  # set while the scheduler waits for an allowance
        self._rate: collections.deque[tuple[float, int]] = collections.deque()
        self._rate_window = rate_window_s
        self._thread = threading.Thread(target=self._run, name="pyllm-engine", daemon=True)
        self._thread.start()

    # ---- public API ---------------------------------------------------------------------------

    # ---- LoRA adapters ------------------------------------------------------------------------

    def lora_adapters(self) -> list[dict[str, Any]]:
        """The adapters loaded at start: ``{"id", "path", "scale"}`` (the global scale)."""
        with self._cv:
            return [{"id": i, "path": str(p), "scale": s}
                    for i, (p, s) in enumerate(zip(self._lora_paths, self._lora_scales,
                                                   strict=True))]

    def check_lora(self, mix: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
        """A request's [(id, scale)], checked (ModelError naming the problem)."""
        out: list[tuple[int, float]] = []
        for i, scale in mix:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(
                    self._lora_paths):
                raise ModelError(f"LoRA adapter id {i!r} is not one of the "
                                 f"{len(self._lora_paths)} loaded at start (--lora)")
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or \
                    not math.isfinite(scale):
                raise ModelError(f"the scale of LoRA adapter {i} must be a finite number, "
                                 f"got {scale!r}")
            out.append((i, float(scale)))
        return out

    def set_lora_scales(self, mix: Sequence[tuple[int, float]]) -> None:
        """Global scales (llama.cpp's POST /lora-adapters): the listed ids get their scale, the
        others 0; requests without their own `lora` use them from their next admission."""
        checked = self.check_lora(mix)
        with self._cv:
            self._lora_scales = [0.0] * len(self._lora_paths)
            for i, scale in checked:
                self._lora_scales[i] = scale

    def _mix_of(self, req: Request | None) -> list[tuple[int, float]]:
        """A request's adapters; None (or no `lora` field): the global scales."""
        if req is not None and req.lora is not None:
            return [(i, s) for i, s in req.lora if s != 0.0]
        return [(i, s) for i, s in enumerate(self._lora_scales) if s != 0.0]

    def submit(self, req: Request) -> Handle:
        """Queue a request. Raises ContextError when the prompt (+ max_tokens) cannot fit a slot,
        QueueFullError when the queue is full, EngineStoppedError after :meth:`stop`,
        ModelError for a `lora` entry that names no loaded adapter."""
        if req.lora is not None:
            req = dataclasses.replace(req, lora=self.check_lora(req.lora))
        n = len(req.prompt)
        limit = resolve_max_tokens(req.max_tokens)  # SamplingError below -1
        if limit != req.max_tokens:
            req = dataclasses.replace(req, max_tokens=limit)
        if n == 0:
            raise ContextError("the prompt is empty (no tokens)")
        if n >= self.n_ctx:
            raise ContextError(f"the prompt has {n} tokens; a slot's context holds {self.n_ctx} "
                               f"(n_ctx), leaving no room to generate")
        if req.max_tokens is not None and n + req.max_tokens > self.n_ctx:
            raise ContextError(f"the prompt ({n} tokens) + max_tokens ({req.max_tokens}) exceed "
                               f"the context size of a slot ({self.n_ctx})")
        bad = [t for t in req.prompt if not 0 <= t < self.n_vocab]
        if bad:
            raise ContextError(f"token id {bad[0]} is outside the vocabulary "
                               f"(n_vocab {self.n_vocab})")
        # validates logit_bias against the vocabulary; the prompt is penalty history
        constraint = None if req.grammar is None else Constraint(req.grammar, self.tokenizer,
                                                                 self.n_vocab)
        steps = SequenceSteps(self.tokenizer, self.n_vocab, req.prompt, req.params,
                              max_tokens=req.max_tokens, n_ctx=self.n_ctx, stop=req.stop,
                              stop_tokens=self.stop_ids, logprobs=req.logprobs,
                              constraint=constraint, keep_special=req.keep_special)
        job = _Job(next(self._ids), req, steps, time.monotonic())
        with self._cv:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            self._check_queue()
            self._pending.append(job)
            self.stats.requests_total += 1
            self.stats.prompt_tokens_total += n
            self._cv.notify()
        return Handle(job, self)

    @property
    def supports_embeddings(self) -> bool:
        """Whether the extension has the embeddings entry (``Context.embed``)."""
        return hasattr(self._ctx, "embed")

    @property
    def n_embd(self) -> int:
        return self.model.n_embd

    @property
    def chat_template(self) -> str | None:
        """The model file's Jinja chat template, if it has one."""
        return self.model.chat_template

    def submit_embedding(self, tokens: Sequence[int],
                         on_done: Callable[[np.ndarray | None, str | None], None]) -> Handle:
        """Queue an embedding: ``on_done(vector, None)`` with the L2-normalized mean of the
        final-normed hidden states, or ``on_done(None, reason)`` ("cancelled" or an error).
        It runs between two steps in a free slot (whose cache it empties)."""
        if not self.supports_embeddings:
            raise ModelError("this build of the pyllm extension has no embeddings entry")
        toks = [int(t) for t in tokens]
        if not toks:
            raise ContextError("the input is empty (no tokens)")
        if len(toks) > self.n_ctx:
            raise ContextError(f"the input has {len(toks)} tokens; a slot's context holds "
                               f"{self.n_ctx} (n_ctx)")
        bad = [t for t in toks if not 0 <= t < self.n_vocab]
        if bad:
            raise ContextError(f"token id {bad[0]} is outside the vocabulary "
                               f"(n_vocab {self.n_vocab})")
        job = _EmbedJob(next(self._ids), toks, on_done)
        with self._cv:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            self._check_queue()
            self._embeds.append(job)
            self._cv.notify()
        return Handle(job, self)

    # ---- slots: their states on disk (the server's /slots) ----------------------------------

    @property
    def model_identity(self) -> str:
        return self.model.identity

    @property
    def model_path(self) -> Any:
        return self.model.model_path

    def slots_info(self) -> list[dict[str, Any]]:
        """Each slot: id, n_ctx, whether it is busy, the tokens its cache holds."""
        with self._cv:
            return [{"id": s.id, "n_ctx": self.n_ctx,
                     "is_processing": s.job is not None or s.embedding,
                     "n_cached": len(s.cached)} for s in self._slots]

    def slot_action(self, slot_id: int, action: str, path: Any = None,
                    timeout: float = 60.0) -> dict[str, Any]:
        """Save slot ``slot_id``'s cache to the state file ``path``, restore it from one, or
        erase it (llama.cpp's /slots actions), between two steps; the slot must be idle.
        Raises ContextError (busy, unknown slot), StateFileError (a bad file)."""
        if isinstance(slot_id, bool) or not isinstance(slot_id, int) or \
                not 0 <= slot_id < self.n_parallel:
            raise ContextError(f"no slot {slot_id!r} (the server has {self.n_parallel})")
        if action not in ("save", "restore", "erase"):
            raise ContextError(f"unknown slot action {action!r} (save, restore or erase)")
        done = threading.Event()
        result: dict[str, Any] = {}
        failure: list[BaseException] = []

        def op() -> None:
            try:
                result.update(apply_slot_action(self, self._slots[slot_id], action, path))
            except BaseException as e:  # handed to the caller's thread
                failure.append(e)
            finally:
                done.set()

        with self._cv:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            self._slot_ops.append(op)
            self._cv.notify()
        if not done.wait(timeout):
            raise ContextError(f"slot {slot_id}: the {action} did not run within {timeout:g} s")
        if failure:
            raise failure[0]
        return result

    def _lora_key(self, mix: Sequence[tuple[int, float]]) -> tuple[tuple[str, float], ...]:
        return tuple((str(self._lora_paths[i]), float(s)) for i, s in mix if s != 0.0)

    def _check_queue(self) -> None:
        waiting = len(self._pending) + len(self._embeds)
        if waiting >= self.max_queue and self.active >= self.n_parallel:
            self.stats.requests_rejected += 1
            raise QueueFullError(f"all {self.n_parallel} slots are busy and {waiting} "
                                 f"requests are waiting")

    def stop(self, timeout: float | None = 10.0) -> None:
        """Cancel everything queued or running and end the scheduler thread."""
        with self._cv:
            self._stopping = True
            for job in self._pending:
                job.cancelled = True
            for ejob in self._embeds:
                ejob.cancelled = True
            for slot in self._slots:
                if slot.job is not None:
                    slot.job.cancelled = True
            self._cv.notify()
        self._thread.join(timeout)
        if self._drafting is not None and not self._thread.is_alive():
            self._drafting.close()

    # ---- test hook: deterministic control of the scheduler ----------------------------------

    def pause(self) -> None:
        """Hold the scheduler before its next step (a step already running completes). For
        tests: what happens between two steps no longer depends on the machine's speed."""
        with self._cv:
            self._allowance = 0

    def resume(self, steps: int | None = None) -> None:
        """Let the scheduler run freely (``steps`` None), or take exactly ``steps`` more steps
        and then hold again."""
        with self._cv:
            self._held.clear()  # the scheduler sets it again when it next waits
            self._allowance = steps
            self._cv.notify()

    def wait_held(self, timeout: float) -> bool:
        """Wait until the paused scheduler is holding (with work waiting); False on timeout."""
        return self._held.wait(timeout)

    @property
    def cancels_pending(self) -> int:
        """Requests cancelled whose cancellation the scheduler has not processed yet."""
        with self._cv:
            return (sum(j.cancelled for j in self._pending)
                    + sum(j.cancelled for j in self._embeds)
                    + sum(s.job is not None and s.job.cancelled for s in self._slots))

    @property
    def queue_depth(self) -> int:
        return len(self._pending) + len(self._embeds)

    @property
    def active(self) -> int:
        return sum(s.job is not None or s.embedding for s in self._slots)

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last ``rate_window_s`` seconds."""
        now = time.monotonic()
        with self._cv:
            while self._rate and self._rate[0][0] < now - self._rate_window:
                self._rate.popleft()
            n = sum(k for _, k in self._rate)
        return n / self._rate_window

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # ---- scheduler ----------------------------------------------------------------------------

    def _cancel(self, job: _Job | _EmbedJob) -> None:
        with self._cv:
            job.cancelled = True
            self._cv.notify()

    def _run(self) -> None:
        while True:
            try:
                with self._cv:
                    while (not self._stopping and not self._pending and not self._embeds
                           and not self._slot_ops
                           and all(s.job is None for s in self._slots)):
                        self._cv.wait()
                    self._hold_if_paused()
                    free = any(s.job is None for s in self._slots)
                    settle = bool(self._stopping or (self._pending and free) or self._embeds
                                  or self._slot_ops or any(s.job is not None and s.job.cancelled
                                                           for s in self._slots))
                while settle and self._flights:  # what changes slots waits for them to land
                    self._land(self._flights.popleft())
                with self._cv:
                    self._drop_cancelled()
                    if (self._stopping and not self._pending and not self._embeds
                            and self.active == 0):
                        return
                    embed = self._take_embedding()
                    ops = list(self._slot_ops)
                    self._slot_ops.clear()
                    self._admit()
                for op in ops:  # between two steps, on this thread (it owns the context)
                    op()
                if embed is not None:
                    self._embed(*embed)
                self._step()
            except Exception as e:  # a bug must fail the requests involved, never the server
                self._fail_all(f"internal error in the engine: {type(e).__name__}: {e}")

    def _hold_if_paused(self) -> None:
        """The pause/resume test hook (called with the lock held): wait while no step is
        allowed, count the step about to start."""
        while self._allowance == 0 and not self._stopping:
            self._held.set()
            self._cv.wait()
        if self._allowance is not None and self._allowance > 0:
            self._allowance -= 1

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._pending if j.cancelled]:
            self._pending.remove(job)
            self._finish(job, "cancelled")
        for ejob in [j for j in self._embeds if j.cancelled]:
            self._embeds.remove(ejob)
            self._deliver(ejob, None, "cancelled")
        for slot in self._slots:
            if slot.job is not None and slot.job.cancelled:
                self._release(slot, "cancelled")

    def _take_embedding(self) -> tuple[_EmbedJob, _Slot] | None:
        """The next embedding and the free slot it may use (the one with the least cached, as
        the embedding empties it); one per step so running generations keep going."""
        free = [s for s in self._slots if s.job is None and not s.embedding]
        if not self._embeds or not free:
            return None
        slot = min(free, key=lambda s: len(s.cached))
        slot.embedding = True
        return self._embeds.popleft(), slot

    def _embed(self, job: _EmbedJob, slot: _Slot) -> None:
        vec: np.ndarray | None = None
        err: str | None = None
        try:
            # the global adapters, whatever the slot's last request used (embed() empties it)
            mix = self._mix_of(None)
            if slot.lora != mix:
                self._ctx.seq_set_lora(slot.id, mix)
                slot.lora = mix
            vec = np.asarray(self._ctx.embed(np.asarray(job.tokens, dtype=np.int32), slot.id),
                             dtype=np.float32)
            norm = float(np.linalg.norm(vec))
            if norm > 0:
                vec = vec / norm
        except Exception as e:  # validated before, so a bug: fail this request only
            err = f"embedding failed: {type(e).__name__}: {e}"
        finally:
            slot.cached = []  # embed() leaves the sequence empty
            slot.embedding = False
        with self._cv:
            self.stats.embeddings_total += 1
            self.stats.embedding_tokens_total += len(job.tokens)
        self._deliver(job, vec, err)

    def _deliver(self, job: _EmbedJob, vec: np.ndarray | None, err: str | None) -> None:
        with contextlib.suppress(Exception):  # the consumer went away: nothing else to do
            job.on_done(vec, err)

    def _admit(self) -> None:
        """Move waiting jobs into free slots: the slot sharing the longest prefix with the
        prompt, so that the cached part is not evaluated again."""
        while self._pending:
            free = [s for s in self._slots if s.job is None and not s.embedding]
            if not free:
                return
            job = self._pending.popleft()
            if job.steps.done:  # max_tokens 0: nothing to evaluate
                self._finish(job, job.steps.finish_reason)
                continue
            prompt = job.req.prompt
            mix = self._mix_of(job.req)
            # longest shared prefix computed with the same adapters; on a tie the slot with the
            # least cached (least to lose)
            slot = max(free, key=lambda s: (common_prefix(s.cached, prompt) if s.lora == mix
                                            else 0, -len(s.cached)))
            if self._ram.restore(self._ctx, slot, prompt, mix):
                self.stats.cache_ram_hits += 1
                self.stats.cache_ram_bytes = self._ram.used
            if slot.lora != mix:  # its cache was made with other adapters: none of it holds
                self._ctx.seq_set_lora(slot.id, mix)
                self._ctx.seq_truncate(slot.id, 0)
                slot.cached.clear()
                slot.lora = mix
            keep = min(common_prefix(slot.cached, prompt), len(prompt) - 1)
            if keep < len(slot.cached):
                self._ram.keep(self._ctx, slot)  # what the slot held may serve a later request
                self.stats.cache_ram_bytes = self._ram.used
                self._ctx.seq_truncate(slot.id, keep)
                del slot.cached[keep:]
            slot.job = job
            slot.todo = prompt[keep:]
            slot.next_token = None
            self.stats.prompt_tokens_evaluated += len(slot.todo)

    def _step(self) -> None:
        """Start the next step's forward; land the oldest in flight once ``depth`` are (with
        one process: every step at once), or when nothing new could start."""
        launched = self._launch()
        while self._flights and (len(self._flights) >= self._depth or not launched):
            self._land(self._flights.popleft())

    def _launch(self) -> bool:
        flying = {i for f in self._flights for i in f.slots}
        plan = plan_step(self._slots, flying, self.n_batch, self._depth, self._drafting)
        if not plan.tokens:
            return False
        args = (np.asarray(plan.tokens, dtype=np.int32), np.asarray(plan.seqs, dtype=np.int32),
                np.asarray(plan.want, dtype=np.uint8))
        t0 = time.perf_counter()
        try:
            forward = self._ctx.submit(*args) if self._depth > 1 else \
                Ran(self._ctx.decode_batch(*args))
        except (IndexError, ValueError) as e:
            # validated before, so this is a bug; the slots involved are in an unknown state
            for slot, _ in plan.fed:
                if slot.job is not None:
                    self._release(slot, None, error=f"decode failed: {e}")
                self._ctx.seq_truncate(slot.id, 0)
                slot.cached.clear()
            return True
        self._flights.append(Flight(plan.fed, plan.owners, forward, t0,
                                    {slot.id for slot, _ in plan.fed}))
        return True

    def _land(self, flight: Flight) -> None:
        logits = flight.forward.wait()
        dt = time.perf_counter() - flight.t0
        with self._cv:
            self.stats.steps_total += 1
            self.stats.step_seconds_total += dt
        for slot, chunk in flight.fed:
            slot.cached.extend(chunk)
            if slot.next_token is None:  # a prompt chunk
                del slot.todo[:len(chunk)]
            else:  # the sampled token (and the draft) are in the cache now
                slot.next_token = None
        generated = 0
        rows: dict[int, list[np.ndarray]] = {}
        for row, slot in zip(logits, flight.owners, strict=True):
            rows.setdefault(slot.id, []).append(row)
        for slot in self._slots:
            if slot.id not in rows or slot.job is None or slot.job.cancelled:
                continue
            try:
                generated += self._verify(slot, rows[slot.id])
            except Exception as e:  # fail this request only; the slot's cache stays valid
                self._release(slot, None, error=f"sampling failed: {type(e).__name__}: {e}")
        if generated:
            with self._cv:
                self._rate.append((time.monotonic(), generated))

    def _verify(self, slot: _Slot, rows: list[np.ndarray]) -> int:
        """A running slot's rows (its sampled token, then each drafted one) or a prompt's last
        row: one step per row while the sampled token is the drafted one; the cache drops the
        draft tokens after the first that was not. Returns the tokens generated."""
        draft, slot.draft = slot.draft, []
        generated = 0
        for i, row in enumerate(rows):
            generated += self._on_logits(slot, row)
            if slot.job is None or i == len(draft) or slot.next_token != draft[i]:
                break
            self.stats.draft_tokens_accepted += 1
        self.stats.draft_tokens_total += len(draft)
        drop = len(draft) - i  # draft tokens after the kept ones (all, if the first missed)
        if drop > 0:
            n = len(slot.cached) - drop
            self._ctx.seq_truncate(slot.id, n)
            del slot.cached[n:]
        return generated

    def _on_logits(self, slot: _Slot, row: np.ndarray) -> int:
        """One step of the slot's sequence from its logits row: emit what it releases, end it
        or queue its token for the next forward; returns 1 if a token was generated."""
        job = slot.job
        assert job is not None
        steps = job.steps
        generated = 0
        for out in steps.advance(row):
            if out.token is not None:
                generated = 1
                self.stats.completion_tokens_total += 1
            self._emit(job, TokenEvent(out.text, out.token, out.logprob))
        if steps.finish_reason is not None:
            self._release(slot, steps.finish_reason)
        else:
            slot.next_token = steps.tokens[-1]
        return generated

    def _release(self, slot: _Slot, reason: str | None, error: str | None = None) -> None:
        job = slot.job
        if job is not None:  # counted before the slot looks free, so stats and idleness agree
            self._finish(job, reason, error)
        slot.job = None
        slot.todo = []
        slot.next_token = None

    def _finish(self, job: _Job, reason: str | None, error: str | None = None) -> None:
        if job.done:
            return
        job.done = True
        if error is not None:
            self._emit(job, ErrorEvent(error))
            reason = "error"
        else:
            assert reason is not None
            self._emit(job, DoneEvent(reason, len(job.req.prompt), len(job.tokens)))
        self.stats.finished[reason] += 1

    def _emit(self, job: _Job, event: Event) -> None:
        try:
            job.req.on_event(event)
        except Exception:  # a consumer that went away must not stop the others
            job.cancelled = True

    def _fail_all(self, message: str) -> None:
        while self._flights:  # a forward in flight lands unseen (MPI uses its buffers)
            with contextlib.suppress(Exception):
                self._flights.popleft().forward.wait()
        with self._cv:
            for slot in self._slots:
                if slot.job is not None:
                    self._release(slot, None, error=message)
                self._ctx.seq_truncate(slot.id, 0)
                slot.cached.clear()
