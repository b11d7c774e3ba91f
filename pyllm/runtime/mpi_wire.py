"""The wire of the layer pipeline over MPI (pyllm/runtime/mpi.py): mpi4py's import, the
message tags, waiting by polling, and the split of a model's layers over the ranks. Below
everything else of the pipeline: rank 0's context (mpi_context.py) and the model's load
(loaded.py) use it without the worker loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pyllm.errors import PipelineError

TAG_CMD, TAG_REPLY, TAG_HIDDEN, TAG_LOGITS, TAG_FAULT = 11, 12, 13, 14, 15

# Polling: a wait checks for its message, then sleeps, doubling from the first interval to the
# last; a wait that has lasted over _IDLE_S (an idle server's workers) sleeps _IDLE_PAUSE_S. An
# MPI blocking receive spins a core at 100 %, which starves the ranks that share the machine's
# cores; this costs a token at most the last interval per wait. Measured on decode (1.1B Q4_0,
# two ranks of one thread on two cores, 15.5 ms per token in one process): a last interval of
# 2 ms added 2.5 ms per token, 1 ms 1.9, 0.2 ms 0.8, 0.05 ms 1.2 (the polling itself then
# competes for the cores).
_POLL_FIRST_S, _POLL_LAST_S = 20e-6, 2e-4
_IDLE_S, _IDLE_PAUSE_S = 1.0, 5e-3


def import_mpi() -> Any:
    """The ``mpi4py.MPI`` module (initializing MPI), or a PipelineError saying how to get it."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise PipelineError(f"--mpi needs mpi4py: pip install \"pyllm[mpi]\" (and a system MPI: "
                            f"apt install openmpi-bin libopenmpi-dev, or MPICH) ({e})") from None
    return MPI


def poll(ready: Callable[[], bool], between: Callable[[], Any] | None = None) -> None:
    """Return once ``ready()``; between checks call ``between()`` (a fault check, which may end
    the job; other sends' progress) and sleep."""
    pause, start = _POLL_FIRST_S, time.monotonic()
    while not ready():
        if between is not None:
            between()
        time.sleep(pause)
        pause = min(pause * 2, _POLL_LAST_S)
        if pause == _POLL_LAST_S and time.monotonic() - start > _IDLE_S:
            pause = _IDLE_PAUSE_S


def parse_layer_split(text: str) -> list[int]:
    """``--layer-split 10,12,10``: the layers of each rank, in rank order."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise PipelineError(f"--layer-split takes layer counts per rank, e.g. 10,12,10; got "
                            f"{text!r}") from None
    if not counts or any(c < 1 for c in counts):
        raise PipelineError(f"--layer-split: every rank needs at least one layer, got {text!r}")
    return counts


def split_layers(layer_bytes: Sequence[int], head_bytes: int, n_ranks: int,
                 counts: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Contiguous layer ranges, one per rank: ``counts`` layers each when given, else balanced by
    bytes (the largest share of any rank as small as it can be, the head's ``head_bytes``
    counted on the last rank). Every rank gets at least one layer."""
    n_layer = len(layer_bytes)
    if counts is not None:
        if len(counts) != n_ranks or sum(counts) != n_layer:
            raise PipelineError(f"--layer-split gives {len(counts)} ranks {sum(counts)} layers; "
                                f"this job has {n_ranks} ranks and the model {n_layer} layers")
        bounds = np.cumsum([0, *counts]).tolist()
        return [(int(bounds[r]), int(bounds[r + 1])) for r in range(n_ranks)]
    if n_ranks > n_layer:
        raise PipelineError(f"{n_ranks} ranks for a model of {n_layer} layers: every rank needs "
                            f"at least one layer")
    prefix = np.cumsum([0, *layer_bytes]).tolist()
    inf = float("inf")
    # best[r][i]: the smallest largest share when ranks 0..r-1 hold layers 0..i-1
    best = [[inf] * (n_layer + 1) for _ in range(n_ranks + 1)]
    cut = [[0] * (n_layer + 1) for _ in range(n_ranks + 1)]
    best[0][0] = 0.0
    for r in range(1, n_ranks + 1):
        extra = head_bytes if r == n_ranks else 0
        for i in range(r, n_layer - (n_ranks - r) + 1):
            for j in range(r - 1, i):
                share = max(best[r - 1][j], prefix[i] - prefix[j] + extra)
                if share < best[r][i]:
                    best[r][i], cut[r][i] = share, j
    ranges: list[tuple[int, int]] = []
    end = n_layer
    for r in range(n_ranks, 0, -1):
        start = cut[r][end]
        ranges.append((start, end))
        end = start
    return ranges[::-1]


def recv_object(comm: Any, source: int, tag: int, between: Callable[[], Any] | None = None
                ) -> Any:
    """Receive a pickled object, polling (see poll) until it has arrived; then the receive
    is sized by the message (a nonblocking pickled receive would need its size up front)."""
    poll(lambda: bool(comm.Iprobe(source=source, tag=tag)), between)
    return comm.recv(source=source, tag=tag)


def recv_array(comm: Any, source: int, tag: int, out: np.ndarray,
               between: Callable[[], Any] | None = None) -> np.ndarray:
    """Receive a float32 buffer into ``out``, polling (see poll); ``between`` runs between
    checks."""
    req = comm.Irecv(out, source=source, tag=tag)
    poll(req.Test, between)
    return out
