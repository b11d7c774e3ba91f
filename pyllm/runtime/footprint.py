"""What an inference context will allocate, checked before it is allocated.

A context holds the KV cache (K and V rows of every layer for ``n_ctx x n_seq`` positions) and
scratch activations for a chunk of ``n_batch`` tokens. Asking for ten million positions must
be refused with the sizes in the message, not discovered by the OOM killer; the estimate here
follows ``CpuDevice::Buffers::resize`` (csrc/cpu/stage.cc), the context's hidden rows
(csrc/model/context.cc) and the K/V allocation (csrc/cpu/kv_cache.cc).
"""

from __future__ import annotations

import warnings

from pyllm.errors import ContextError, PyllmWarning
from pyllm.formats.arch import HParams
from pyllm.formats.gguf.constants import GGMLType, tensor_nbytes
from pyllm.runtime.sysinfo import available_memory, format_bytes

# The kv_type values users may pass: name -> element type of a cache row. The names are the
# member names of pyllm._core.KVType, what a context is created with (``KVType.__members__[name]``),
# and the default is the C++ one (pyllm._core.DEFAULT_KV_TYPE); tests/test_model.py checks both.
KV_ELEMENT_TYPES = {"f16": GGMLType.F16, "q8_0": GGMLType.Q8_0, "f32": GGMLType.F32}
DEFAULT_KV_TYPE = "f16"


def check_kv_type(kv_type: object) -> str:
    """``kv_type`` if it names a KV cache type, else ContextError: the one check of the value."""
    if not isinstance(kv_type, str) or kv_type not in KV_ELEMENT_TYPES:
        raise ContextError(f"kv_type must be one of {sorted(KV_ELEMENT_TYPES)}, got {kv_type!r}")
    return kv_type

# Largest value the C++ side takes for a count (its parameters are 32-bit ints).
MAX_COUNT = (1 << 31) - 1

# The attention kernel's per-thread scratch (csrc/include/pyllm/ops.h): rows per block and
# keys per tile.
_ATTENTION_ROWS = 8
_ATTENTION_KEYS = 16


def kv_cache_bytes(hp: HParams, n_ctx: int, kv_type: str = DEFAULT_KV_TYPE, n_seq: int = 1,
                   n_layer: int | None = None) -> int:
    """Bytes of the K and V caches for ``n_seq`` sequences of ``n_ctx``: of ``n_layer`` layers
    (None: all of them)."""
    row = tensor_nbytes(KV_ELEMENT_TYPES[kv_type], hp.n_head_kv * hp.head_dim)
    layers = hp.n_layer if n_layer is None else n_layer
    return 2 * layers * n_ctx * n_seq * row


def scratch_bytes(hp: HParams, n_ctx: int, n_batch: int, n_threads: int) -> int:
    """Bytes of the activations of one chunk of ``n_batch`` tokens and the attention kernel's
    per-thread scratch (allocated with the context and kept)."""
    q_dim = hp.n_head * hp.head_dim
    kv_dim = hp.n_head_kv * hp.head_dim
    per_token = hp.n_embd + max(hp.n_embd, q_dim) + 2 * q_dim + 2 * kv_dim + 2 * hp.n_ff
    attention = _ATTENTION_ROWS * (n_ctx + _ATTENTION_KEYS + hp.head_dim) + \
        _ATTENTION_KEYS * hp.head_dim
    return 4 * (n_batch * per_token + n_threads * attention)


def logits_bytes(hp: HParams, n_batch: int) -> int:
    """The float32 logits of every position of one chunk: what a call asking for all of them
    (perplexity, ``LLM.logits``) allocates while it runs."""
    return 4 * n_batch * hp.n_vocab


def context_bytes(hp: HParams, n_ctx: int, n_batch: int, n_threads: int,
                  kv_type: str = DEFAULT_KV_TYPE, n_seq: int = 1,
                  host_layers: int | None = None) -> int:
    """The host-memory peak of a context: what it allocates and keeps, plus one chunk's logits.
    ``host_layers``: the layers whose K/V cache is in host memory (None: all; the layers placed
    on a GPU keep theirs on the device, which checks its own memory)."""
    return (kv_cache_bytes(hp, n_ctx, kv_type, n_seq, host_layers)
            + scratch_bytes(hp, n_ctx, n_batch, n_threads) + logits_bytes(hp, n_batch))


def check_context_fits(hp: HParams, n_ctx: int, n_batch: int, n_threads: int,
                       kv_type: str = DEFAULT_KV_TYPE, n_seq: int = 1,
                       available: int | None = None, host_layers: int | None = None) -> int:
    """Raise ContextError when the context would not fit in the memory this process can still
    get; returns the bytes it needs. ``available`` overrides the reading (tests);
    ``host_layers`` as :func:`context_bytes`."""
    need = context_bytes(hp, n_ctx, n_batch, n_threads, kv_type, n_seq, host_layers)
    room = available_memory() if available is None else available
    if room is not None and need > room:
        what = f"n_ctx={n_ctx}" + (f" x {n_seq} sequences" if n_seq > 1 else "")
        kv = kv_cache_bytes(hp, n_ctx, kv_type, n_seq, host_layers)
        raise ContextError(
            f"a context of {what} needs {format_bytes(need)} ({format_bytes(kv)} of {kv_type} "
            f"KV cache) but only {format_bytes(room)} of memory is available; use a smaller "
            f"context size (-c / n_ctx)" + (" or fewer parallel sequences" if n_seq > 1 else "")
            + ("" if kv_type == "q8_0" else " or kv_type q8_0"))
    return need


def warn_if_beyond_training(hp: HParams, n_ctx: int, stacklevel: int = 3) -> None:
    """Warn when the context is longer than the model was trained for: positions past
    ``n_ctx_train`` are extrapolated unless the file declares a RoPE scaling that covers them.
    ``stacklevel`` as :func:`warnings.warn`'s (3: the caller's caller)."""
    if n_ctx <= hp.n_ctx_train:
        return
    factor = n_ctx / hp.n_ctx_train
    if hp.rope_scaling != "none":
        return  # the file's own scaling was chosen for the context it was extended to
    warnings.warn(
        f"n_ctx {n_ctx} exceeds the {hp.n_ctx_train} positions the model was trained on; "
        f"beyond them output degrades unless the model is used with RoPE scaling of about "
        f"{factor:.3g}x (linear or YaRN, rope.scaling.* in the GGUF)",
        PyllmWarning, stacklevel=stacklevel)
