"""Rank 0's context of a model whose layers run as a pipeline over MPI ranks
(:mod:`pyllm.runtime.mpi`).

:class:`PipelineContext` answers the calls of ``pyllm._core.Context`` that the rest of pyllm
makes (:class:`pyllm.LLM`, the server's engine, perplexity, bench), so nothing above it knows
that the layers are spread over processes. Each call that changes the cache goes to every
worker too, after rank 0's own context has checked it (so a bad call changes nothing anywhere);
a forward sends every chunk of ``n_batch`` tokens down the pipeline and gathers the logits the
last rank sends back. Not here: embeddings (``embed``), LoRA adapters and importance-matrix
statistics, which need every layer in one process for now (a PipelineError says so).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from pyllm.errors import PipelineError, PyllmError
from pyllm.runtime.mpi_wire import TAG_HIDDEN, TAG_LOGITS, poll

if TYPE_CHECKING:
    from pyllm.runtime.mpi import Pipeline

_NEEDS_ONE_PROCESS = "in an MPI pipeline for now; run without --mpi to use them"


class PendingForward:
    """A forward on its way down the pipeline: :meth:`wait` returns its logits."""

    def __init__(self, logits: np.ndarray, pending: list[tuple[Any, np.ndarray]],
                 check_faults: Callable[[], None]) -> None:
        self._logits = logits
        self._pending = pending  # MPI requests with the buffers they use
        self._check_faults = check_faults

    def wait(self) -> np.ndarray:
        for req, _ in self._pending:
            poll(req.Test, self._check_faults)
        self._pending = []
        return self._logits

    def __del__(self) -> None:
        # MPI still writes into / reads from the buffers of requests not yet complete
        if self._pending:
            self.wait()


class PipelineContext:
    """The context of ``n_seq`` sequences of ``n_ctx`` positions across a pipeline's ranks:
    rank 0's share (its ``pyllm._core.Context``) plus one on every worker, kept in step."""

    def __init__(self, pipe: Pipeline, model_id: int, make_local: Callable[[], Any],
                 kwargs: dict[str, Any], *, n_vocab: int, n_layer: int,
                 layer_ranges: list[tuple[int, int]], header_bytes: int) -> None:
        """The context ``make_local()`` makes on rank 0 and one of ``kwargs`` (new_context's)
        on every worker, of the model the workers know as ``model_id``; ``header_bytes``: the
        saved state's header (``_core.STATE_HEADER_BYTES``)."""
        self._pipe = pipe
        self._n_vocab = n_vocab
        self._n_batch = int(kwargs["n_batch"])
        self._n_layer = n_layer
        self._ranges = list(layer_ranges)
        self._header_bytes = header_bytes
        self._cid = pipe.new_id()
        self._open = False
        pipe.command("context", self._cid, model_id, kwargs)
        try:
            self._local = make_local()
        except PyllmError:
            self._settle()
            raise
        try:
            pipe.replies()
        except PyllmError:
            pipe.command("drop", self._cid)
            raise
        self._open = True

    def _settle(self) -> None:
        """After rank 0 failed a call the workers also got: take their replies, drop theirs."""
        with contextlib.suppress(PyllmError):
            self._pipe.replies()
        self._pipe.command("drop", self._cid)

    # ---- what the local context knows ----------------------------------------------------------

    @property
    def n_seq(self) -> int:
        return int(self._local.n_seq)

    @property
    def n_ctx(self) -> int:
        return int(self._local.n_ctx)

    @property
    def n_past(self) -> int:
        return int(self._local.n_past)

    @property
    def n_threads(self) -> int:
        return int(self._local.n_threads)

    @property
    def placement(self) -> list[tuple[str, int, int]]:
        """Rank 0's placement: its layers, the others' as ``remote``."""
        return list(self._local.placement)

    def seq_n_past(self, seq: int) -> int:
        return int(self._local.seq_n_past(seq))

    # ---- forward ---------------------------------------------------------------------------------

    def decode(self, tokens: Any, logits: str = "last") -> np.ndarray | None:
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        if logits not in ("last", "all", "none"):
            raise ValueError("logits must be 'all', 'last' or 'none'")
        n = len(tokens)
        want = np.full(n, logits == "all", dtype=np.uint8)
        if logits == "last" and n:
            want[-1] = 1
        out = self.decode_batch(tokens, np.zeros(n, dtype=np.int32), want)
        if logits == "none":
            return None
        return out[0] if logits == "last" else out

    @property
    def depth(self) -> int:
        """Forward calls worth keeping in flight at once (:meth:`submit`): one per rank."""
        return self._pipe.size

    def decode_batch(self, tokens: Any, seq: Any, want_logits: Any) -> np.ndarray:
        """One forward of tokens over their sequences, as ``Context.decode_batch``."""
        return self.submit(tokens, seq, want_logits).wait()

    def submit(self, tokens: Any, seq: Any, want_logits: Any) -> PendingForward:
        """Start a forward (as :meth:`decode_batch`) and return before the later ranks are
        done: this rank's layers have run when it returns. Chunks of ``n_batch`` tokens go down
        the pipeline one after another without waiting (a chunk's layers on rank 0 overlap the
        later ranks' work on the chunk before), and a second forward submitted before the
        first is waited for runs on rank 0 while the later ranks work on the first (the server
        keeps its slots in such flights). Forwards complete in the order submitted."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        seq = np.ascontiguousarray(seq, dtype=np.int32)
        want = np.ascontiguousarray(want_logits, dtype=np.uint8)
        if tokens.ndim != 1 or seq.shape != tokens.shape or want.shape != tokens.shape:
            raise ValueError("tokens, seq and want_logits must be 1-D, same length")
        self._local.check_batch(tokens, seq)  # what the forward would raise, before any rank runs
        ids, counts = np.unique(seq, return_counts=True)
        min_seq_len = max(self._local.seq_n_past(int(s)) + int(c)
                          for s, c in zip(ids, counts, strict=True))
        pipe = self._pipe
        comm, last = pipe.comm, pipe.size - 1
        logits = np.empty((int(np.count_nonzero(want)), self._n_vocab), dtype=np.float32)
        pending: list[tuple[Any, np.ndarray]] = []
        row = 0
        for start in range(0, len(tokens), self._n_batch):
            part = slice(start, start + self._n_batch)
            pipe.command("chunk", self._cid, seq[part], want[part], min_seq_len)
            k = int(np.count_nonzero(want[part]))
            if k:
                dst = logits[row:row + k]
                pending.append((comm.Irecv(dst, source=last, tag=TAG_LOGITS), dst))
                row += k
            hidden = self._local.decode_part(tokens[part], None, seq[part], want[part],
                                             min_seq_len)
            pending.append((comm.Isend(hidden, dest=1, tag=TAG_HIDDEN), hidden))
            pending = [(r, buf) for r, buf in pending if not r.Test()]
        return PendingForward(logits, pending, pipe.check_faults)

    # ---- the cache -------------------------------------------------------------------------------

    def seq_truncate(self, seq: int, n: int) -> None:
        self._local.seq_truncate(seq, n)
        self._pipe.command("truncate", self._cid, seq, n)

    def truncate(self, n: int) -> None:
        self.seq_truncate(0, n)

    def seq_shift(self, seq: int, keep: int, n_discard: int) -> None:
        self._local.seq_shift(seq, keep, n_discard)
        self._pipe.command("shift", self._cid, seq, keep, n_discard)
        self._pipe.replies()

    def save_state(self, seq: int = 0) -> bytes:
        """The state of one sequence, as one process's: the header, then every layer's K/V
        rows in layer order (rank 0's layers, then each worker's)."""
        self._pipe.command("save", self._cid, seq)
        own = bytes(self._local.save_state(seq))
        parts = self._pipe.replies()
        h = self._header_bytes
        for rank, part in enumerate(parts, 1):
            if part[:h] != own[:h]:
                raise PipelineError(f"rank {rank}'s cache is not in step with rank 0's")
        return own + b"".join(part[h:] for part in parts)

    def load_state(self, state: bytes, seq: int = 0) -> None:
        """Load a state (of one process or of a pipeline: the same bytes) into sequence seq,
        each rank its layers' part."""
        blob = bytes(state)
        h = self._header_bytes
        body = blob[h:]
        if len(blob) < h or len(body) % self._n_layer:
            raise ValueError("state size does not match its header")
        per_layer = len(body) // self._n_layer
        parts = [blob[:h] + body[a * per_layer:b * per_layer] for a, b in self._ranges]
        self._local.load_state(parts[0], seq)  # checks the header: model, KV type, size
        for rank in range(1, self._pipe.size):
            self._pipe.command_to(rank, "load_state", self._cid, parts[rank], seq)
        try:
            self._pipe.replies()
        except PyllmError:
            self.seq_truncate(seq, 0)  # no rank keeps a half-loaded sequence
            raise

    # ---- what needs every layer in one process -------------------------------------------------

    def set_lora_adapters(self, adapters: list[Any]) -> None:
        if adapters:
            raise PipelineError(f"LoRA adapters cannot be applied {_NEEDS_ONE_PROCESS}")

    def seq_set_lora(self, seq: int, mix: list[Any]) -> None:
        if mix:
            raise PipelineError(f"LoRA adapters cannot be applied {_NEEDS_ONE_PROCESS}")

    def collect_activation_stats(self, on: bool) -> None:
        if on:
            raise PipelineError(f"importance-matrix statistics are not collected "
                                f"{_NEEDS_ONE_PROCESS}")

    def close(self) -> None:
        """Drop this context on every rank."""
        if self._open:
            self._open = False
            if not self._pipe.closed:
                self._pipe.command("drop", self._cid)

    def __del__(self) -> None:
        # at interpreter shutdown the pipeline may be gone: the workers exit anyway
        with contextlib.suppress(Exception):
            self.close()
