"""Computing an importance matrix (``pyllm imatrix``), the way llama.cpp's ``llama-imatrix`` does.

The text is tokenized once (with BOS when the vocabulary adds one) and cut into chunks of
``n_ctx`` tokens (a trailing partial chunk is dropped; at least two chunks are needed, as
llama.cpp asks); each chunk is evaluated from an empty context with its first token replaced by
BOS (when the model uses one), and every matmul input of every token is added to the statistics
(the C++ context collects them, ``Context.collect_activation_stats``). Each weight matrix gets the
sums of its input: q, k and v (or a fused qkv) the normed hidden state, the output projection the
attention output, gate and up the normed hidden state, down the SwiGLU product; ``output.weight``
only with ``process_output`` (llama.cpp's ``--process-output``: off by default, and never for tied
embeddings). The perplexity of each chunk's second half is reported on the way, as llama.cpp does.

The result is a :class:`~pyllm.formats.imatrix.Imatrix`; ``pyllm imatrix`` writes it in
llama.cpp's GGUF format (or its legacy ``.dat``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyllm.errors import QuantError
from pyllm.formats.imatrix import Imatrix

# Which stats slot feeds which block matrices (pyllm/activation_stats.h names the slots).
SLOT_MATRICES: dict[str, tuple[str, ...]] = {
    "attn_in": ("attn_q", "attn_k", "attn_v", "attn_qkv"),
    "attn_out": ("attn_output",),
    "ffn_in": ("ffn_gate", "ffn_up"),
    "ffn_down": ("ffn_down",),
}


@dataclass
class ChunkReport:
    chunk: int
    n_chunks: int
    ppl: float  # running perplexity over the chunks so far (NaN when not computed)
    seconds: float


def stats_to_imatrix(stats: dict[str, Any], tensor_names: set[str], process_output: bool,
                     into: Imatrix) -> None:
    """Add the C++ context's activation statistics to ``into`` under the model's tensor names
    (only the matrices the model has)."""
    for i, layer in enumerate(stats["layers"]):
        n = int(layer["n_tokens"])
        if n == 0:
            continue
        for slot, matrices in SLOT_MATRICES.items():
            for m in matrices:
                name = f"blk.{i}.{m}.weight"
                if name in tensor_names:
                    into.add(name, np.asarray(layer[slot], dtype=np.float64).astype(np.float32), n)
    if process_output and "output.weight" in tensor_names and stats["n_output"] > 0:
        into.add("output.weight", np.asarray(stats["output"]).astype(np.float32),
                 int(stats["n_output"]))


def compute_imatrix(llm: Any, tokens: np.ndarray, n_ctx: int, n_chunks: int | None = None,
                    process_output: bool = False, compute_ppl: bool = True,
                    dataset: str | None = None,
                    on_chunk: Callable[[ChunkReport], None] | None = None) -> Imatrix:
    """The importance matrix of ``llm`` (a :class:`pyllm.LLM` with ``n_ctx`` >= this one) over
    ``tokens``: ``n_chunks`` chunks of ``n_ctx`` (all whole chunks by default)."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 4:
        raise QuantError(f"the context size must be an integer >= 4, got {n_ctx!r}")
    if llm.n_ctx < n_ctx:
        raise QuantError(f"the model was loaded with n_ctx={llm.n_ctx} < {n_ctx}")
    toks = np.asarray(tokens, dtype=np.int32)
    if toks.size < 2 * n_ctx:
        raise QuantError(f"the text tokenizes to {toks.size} tokens; a context of {n_ctx} needs "
                         f"at least {2 * n_ctx} (give more text or a smaller -c)")
    available = toks.size // n_ctx
    count = available if n_chunks is None or n_chunks < 0 else min(n_chunks, available)
    if count < 1:
        raise QuantError("no chunk to process (--chunks 0)")
    tok = llm.tokenizer
    bos = tok.bos_id if tok.add_bos else None
    names = llm.model.tensor_names
    im = Imatrix(datasets=[dataset] if dataset else [], chunk_size=n_ctx)
    ctx = llm._ctx
    first = n_ctx // 2
    nll_sum, nll_n = 0.0, 0
    t0 = time.perf_counter()
    ctx.collect_activation_stats(True)
    try:
        for c in range(count):
            chunk = np.array(toks[c * n_ctx:(c + 1) * n_ctx], dtype=np.int32)
            if bos is not None:
                chunk[0] = bos
            logits = llm.logits(chunk)
            if compute_ppl:
                x = np.asarray(logits[first:n_ctx - 1], dtype=np.float64)
                x = x - x.max(axis=-1, keepdims=True)
                logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
                targets = toks[c * n_ctx + first + 1:(c + 1) * n_ctx]
                nll_sum -= float(logp[np.arange(targets.size), targets].sum())
                nll_n += targets.size
            if on_chunk is not None:
                ppl = math.exp(nll_sum / nll_n) if nll_n else float("nan")
                on_chunk(ChunkReport(c, count, ppl, time.perf_counter() - t0))
    finally:
        ctx.collect_activation_stats(False)
    stats = ctx.activation_stats()
    stats_to_imatrix(stats, names, process_output, im)
    im.chunk_count = count
    return im

