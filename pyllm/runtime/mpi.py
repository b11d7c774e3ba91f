"""A layer pipeline over MPI: one model's layers split over the ranks of an MPI job, so that a
model larger than one machine's memory runs on several.

``mpirun -np N pyllm run|serve|perplexity|bench --mpi ...`` starts N copies of the command.
Rank 0 is the program (tokenizer, sampler, CLI or HTTP server); the other ranks run
:func:`serve_worker`: they load the layers rank 0 assigns them and run, for each chunk of
tokens, their layers over the hidden rows the previous rank sends, handing theirs on to the next
(the last rank sends the logits back to rank 0). Each rank holds only its layers' weights and
K/V cache: in the C++ model the other layers are a ``remote`` placement range (csrc/model/
placement.h), never read, and :meth:`Context.decode_part` runs one rank's share.

The transport is MPI through ``mpi4py`` (``pip install "pyllm[mpi]"``), imported only when a
pipeline is made (mpi_wire.py: the tags, the waits, the split of the layers). Messages, rank 0
to every worker, in order (``TAG_CMD``, pickled): commands that change a context (a chunk to
run, truncate, shift, save/load a state, new or dropped model/context). A chunk's hidden rows
go rank to rank (``TAG_HIDDEN``, float32 buffers), its logits from the last rank to rank 0
(``TAG_LOGITS``). Replies (``TAG_REPLY``) answer the
commands that can fail on a worker (load, context, state, shift). Every rank keeps the same
positions per sequence, since every rank sees every command: so the chunk plan (positions, RoPE
angles, which keys each token sees) is made by each rank from the same inputs, and only hidden
rows travel.

Chunks are pipelined: rank 0 sends a long batch as chunks of ``n_batch`` tokens, the next one
starting on its layers while the later ranks work on the one before (a chunk's K/V at a layer
depends only on earlier chunks at that layer), so prompt evaluation and perplexity keep every
rank busy. A decode step of one token cannot overlap with itself: its ranks run one after the
other, and the hop (one message of n_embd floats per rank boundary) is the pipeline's cost; the
server keeps several steps of different slots in flight instead (pyllm/server/flights.py).

Faults: a worker that cannot load its layers (missing file, out of memory) or runs another pyllm
version or sees another model file (the identity hash of header and tensor table) is refused on
rank 0 with a :class:`PipelineError` naming the rank; a worker failing during a forward reports
to rank 0, which prints one ``error:`` line naming the rank and ends the job (``MPI_Abort``: a
pipeline whose caches disagree cannot go on). A rank that dies is mpirun's to report: it ends
every other rank and names the rank and its signal.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pyllm.errors import PipelineError, PyllmError
from pyllm.runtime.mpi_wire import (
    TAG_CMD,
    TAG_FAULT,
    TAG_HIDDEN,
    TAG_LOGITS,
    TAG_REPLY,
    import_mpi,
    poll,
    recv_array,
    recv_object,
)
from pyllm.runtime.sysinfo import peak_rss_bytes


class Pipeline:
    """This process's place in an MPI job that runs one model's layers as a pipeline.

    ``Pipeline()`` joins ``MPI.COMM_WORLD`` (import and initialization of MPI happen here).
    On rank 0 pass it to :class:`pyllm.LLM` / :class:`pyllm.LoadedModel` (``pipeline=``): the
    model's layers are split over the ranks (``layer_split``: layer counts per rank, else
    balanced by bytes) and its contexts run across them. Every other rank calls
    :meth:`serve` (or :func:`serve_worker`), which returns when rank 0 calls :meth:`shutdown`
    (at the latest when rank 0's interpreter exits)::

        pipe = pyllm.Pipeline()
        if pipe.rank != 0:
            sys.exit(pipe.serve())
        llm = pyllm.LLM("model.gguf", pipeline=pipe)

    Args:
        layer_split: Layers per rank, in rank order (None: balanced by bytes).
        comm: The MPI communicator (None: ``MPI.COMM_WORLD``).
    """

    def __init__(self, layer_split: Sequence[int] | None = None, comm: Any = None) -> None:
        mpi = import_mpi()
        self.comm: Any = comm if comm is not None else mpi.COMM_WORLD
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        self.layer_split = list(layer_split) if layer_split is not None else None
        self._next_id = 0
        self._closed = False
        self._sends: list[Any] = []  # rank 0: requests of commands not yet known delivered
        # ranks on this machine (a collective: every rank makes its Pipeline at start)
        local = self.comm.Split_type(mpi.COMM_TYPE_SHARED)
        try:
            self.local_size: int = local.Get_size()
        finally:
            local.Free()
        if self.rank == 0 and self.size > 1:
            import atexit

            atexit.register(self.shutdown)

    # ---- sizes ---------------------------------------------------------------------------------

    def default_threads(self) -> int:
        """Threads per rank when none are asked for: this rank's CPUs (mpirun may bind it to
        some), shared with the other ranks on this machine.

        Returns:
            The thread count.
        """
        from pyllm.runtime.sysinfo import available_cpus

        return max(1, min(available_cpus(), (os.cpu_count() or 1) // self.local_size))

    def peak_rss(self) -> list[int]:
        """Every rank's peak resident memory in bytes, in rank order (rank 0 only).

        Returns:
            Bytes per rank.
        """
        from pyllm.runtime.sysinfo import peak_rss_bytes

        self.command("rss")
        return [peak_rss_bytes(), *self.replies()]

    def new_id(self) -> int:
        """A fresh id for an object the ranks create together (a model, a context).

        Returns:
            The id, unique within this pipeline.
        """
        self._next_id += 1
        return self._next_id

    # ---- rank 0: commands ----------------------------------------------------------------------

    def command(self, *cmd: Any) -> None:
        """Send a command to every worker (rank 0 only; in order with the earlier ones).

        Args:
            *cmd: The command name and its arguments (pickled).
        """
        for rank in range(1, self.size):
            self.command_to(rank, *cmd)

    def command_to(self, rank: int, *cmd: Any) -> None:
        """Send a command to one worker (what differs per rank, e.g. its part of a state).

        Args:
            rank: The worker's rank.
            *cmd: The command name and its arguments (pickled).
        """
        if self._closed:
            raise PipelineError("the MPI pipeline has been shut down")
        self._sends = [r for r in self._sends if not r.Test()]
        self._sends.append(self.comm.isend(cmd, dest=rank, tag=TAG_CMD))

    @property
    def closed(self) -> bool:
        """Whether rank 0 has told the workers to exit (nothing more can be sent)."""
        return self._closed

    def replies(self) -> list[Any]:
        """Every worker's reply to the last command that has one, in rank order; a worker's
        error as a PipelineError naming the rank (after every reply has arrived, so the
        protocol stays in step).

        Returns:
            The replies of ranks 1 to N-1.

        Raises:
            PipelineError: A worker failed.
        """
        out: list[Any] = []
        failed: list[str] = []
        for rank in range(1, self.size):
            ok, value = recv_object(self.comm, rank, TAG_REPLY, self.check_faults)
            if not ok:
                failed.append(f"rank {rank}: {value}")
            out.append(value)
        if failed:
            raise PipelineError("; ".join(failed))
        return out

    def check_faults(self) -> None:
        """Rank 0: a worker's report of a failure during a forward ends the job (one ``error:``
        line naming the rank, then MPI_Abort)."""
        status = import_mpi().Status()
        if self.comm.Iprobe(source=import_mpi().ANY_SOURCE, tag=TAG_FAULT, status=status):
            message = self.comm.recv(source=status.Get_source(), tag=TAG_FAULT)
            self.abort(f"rank {status.Get_source()}: {message}")

    def abort(self, message: str) -> None:
        """End the whole MPI job after a fault that leaves the ranks out of step.

        Args:
            message: Why, printed before the job ends.
        """
        print(f"error: {message}", file=sys.stderr, flush=True)
        self.comm.Abort(1)

    def shutdown(self) -> None:
        """Rank 0: tell the workers to exit (idempotent; also run at interpreter exit)."""
        if self.rank != 0 or self._closed or self.size == 1:
            self._closed = True
            return
        self.command("exit")
        for req in self._sends:
            poll(req.Test)
        self._sends.clear()
        self._closed = True

    # ---- the other ranks -------------------------------------------------------------------------

    def serve(self) -> int:
        """Run as a worker until rank 0 shuts the pipeline down (see :func:`serve_worker`).

        Returns:
            The process exit code (0 after a clean shutdown).
        """
        return serve_worker(self)


# ---- the worker loop ------------------------------------------------------------------------


class _Worker:
    """One worker rank's models and contexts, by rank 0's ids, and its handling of commands."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self.comm = pipe.comm
        self.models: dict[int, Any] = {}
        self.contexts: dict[int, Any] = {}
        # hidden rows / logits on their way, each with its buffer (kept alive until sent)
        self.sends: list[tuple[Any, np.ndarray]] = []

    def reply(self, ok: bool, value: Any = None) -> None:
        self.comm.send((ok, value), dest=0, tag=TAG_REPLY)

    def next_command(self) -> tuple[Any, ...]:
        return tuple(recv_object(self.comm, 0, TAG_CMD, self._drain))

    def _drain(self) -> bool:
        self.sends = [(r, buf) for r, buf in self.sends if not r.Test()]
        return False

    def load(self, mid: int, path: str, options: dict[str, Any], ranges: list[tuple[int, int]],
             version: str, identity: str) -> None:
        import pyllm
        from pyllm.formats.gguf.split import open_gguf
        from pyllm.runtime.loaded import LoadedModel, model_identity

        if version != pyllm.__version__:
            raise PipelineError(f"runs pyllm {pyllm.__version__}, rank 0 runs {version}: "
                                f"install the same version on every machine")
        with open_gguf(path) as reader:
            if model_identity(reader) != identity:
                raise PipelineError(f"sees another model file at {path} than rank 0 (header or "
                                    f"tensor table differ): give every rank the same file")
        if options.get("n_threads") is None:
            options["n_threads"] = self.pipe.default_threads()
        first, last = ranges[self.pipe.rank]
        self.models[mid] = LoadedModel(path, layer_range=(first, last), **options)

    def run(self) -> int:
        while True:
            cmd = self.next_command()
            op = cmd[0]
            if op == "exit":
                for req, _ in self.sends:
                    poll(req.Test)
                return 0
            if op == "chunk":
                self.chunk(*cmd[1:])
                continue
            try:
                value = self.handle(op, cmd[1:])
            except (PyllmError, ValueError, IndexError, MemoryError, OSError) as e:
                if op in _NO_REPLY:
                    raise
                self.reply(False, _message(e))
            else:
                if op not in _NO_REPLY:
                    self.reply(True, value)

    def handle(self, op: str, args: tuple[Any, ...]) -> Any:
        if op == "load":
            self.load(*args)
            return peak_rss_bytes()
        if op == "rss":
            return peak_rss_bytes()
        if op == "unload":
            model = self.models.pop(args[0], None)
            if model is not None:
                model.close()
            return None
        if op == "context":
            cid, mid, kwargs = args
            model = self.models[mid]
            self.contexts[cid] = (model.new_context(**kwargs), model.n_embd)
            return None
        if op == "drop":
            self.contexts.pop(args[0], None)
            return None
        ctx = self.contexts[args[0]][0]
        if op == "truncate":
            ctx.seq_truncate(args[1], args[2])
            return None
        if op == "shift":
            ctx.seq_shift(*args[1:])
            return None
        if op == "save":
            return bytes(ctx.save_state(args[1]))
        if op == "load_state":
            ctx.load_state(args[1], args[2])
            return None
        raise PipelineError(f"unknown pipeline command {op!r}")

    def chunk(self, cid: int, seq: np.ndarray, want: np.ndarray, min_seq_len: int) -> None:
        """One chunk: hidden rows from the rank before, this rank's layers, rows (or the last
        rank's logits) on."""
        ctx, n_embd = self.contexts[cid]
        rank, size = self.pipe.rank, self.pipe.size
        hidden = np.empty((len(seq), n_embd), dtype=np.float32)
        recv_array(self.comm, rank - 1, TAG_HIDDEN, hidden, self._drain)
        out = ctx.decode_part(None, hidden, seq, want, min_seq_len)
        if rank + 1 < size:
            self.sends.append((self.comm.Isend(out, dest=rank + 1, tag=TAG_HIDDEN), out))
        elif len(out):
            self.sends.append((self.comm.Isend(out, dest=0, tag=TAG_LOGITS), out))


# commands rank 0 does not wait for: a failure there is a fault that ends the job
_NO_REPLY = frozenset({"truncate", "drop", "unload", "chunk"})


def _message(e: BaseException) -> str:
    if isinstance(e, MemoryError):
        return "out of memory"
    return str(e) or type(e).__name__


def serve_worker(pipe: Pipeline) -> int:
    """A worker rank's whole life: handle rank 0's commands until it says exit (returns 0). A
    failure outside a command's reply (during a forward) is reported to rank 0, which ends the
    job; if rank 0 does not within a few seconds, this rank ends it."""
    if pipe.rank == 0:
        raise PipelineError("rank 0 runs the program; serve() is for the other ranks")
    # SIGTERM / Ctrl-C are rank 0's to handle: it drains and then tells the workers to exit
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = _Worker(pipe)
    try:
        return worker.run()
    except Exception as e:  # noqa: BLE001 - every failure must reach rank 0, never hang the job
        pipe.comm.send(_message(e), dest=0, tag=TAG_FAULT)
        time.sleep(5)  # rank 0 reports and aborts; if it cannot, this rank does
        print(f"error: rank {pipe.rank}: {_message(e)}", file=sys.stderr, flush=True)
        pipe.comm.Abort(1)
        return 1
