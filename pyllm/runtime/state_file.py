"""State files: an :class:`~pyllm.runtime.llm.LLMState` on disk (llama.cpp's ``--prompt-cache``,
the server's slot save / restore), versioned and bound to the model that computed it.

Layout (little-endian): the magic ``PYLLMST\\0``, a u32 format version, a u32 header length and
the header (JSON: the model identity, the KV cache type, the LoRA adapters, the tokens, the
lengths and SHA-256 of the two blobs), then the KV blob (the context's own state, which carries
its own checks) and the last logits (float32, may be empty). A file of another model, another
KV type, another version, a truncated or altered one is refused with a :class:`StateFileError`
saying which; files are written atomically (:mod:`pyllm.atomic`).

The model identity (:attr:`pyllm.runtime.loaded.LoadedModel.identity`) is a SHA-256 over the
model's metadata and tensor table (names, types, shapes, offsets): two files with the same
weights layout and metadata are the same model for a state, reading no weights (a 40 GB model
is identified in milliseconds).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pyllm.atomic import atomic_output
from pyllm.errors import StateFileError

if TYPE_CHECKING:
    from pyllm.runtime.llm import LLMState

class StateOwner(Protocol):
    """What a state file is checked against: an :class:`~pyllm.runtime.llm.LLM`, or the server's
    engine (its slots)."""

    @property
    def model_identity(self) -> str: ...
    @property
    def model_path(self) -> Any: ...
    kv_type: str
    n_ctx: int
    n_vocab: int


MAGIC = b"PYLLMST\0"
VERSION = 1
MAX_HEADER = 64 << 20  # the header holds the token ids: 64 MiB is millions of them


def save_state_file(llm: StateOwner, path: str | os.PathLike[str],
                    state: LLMState | None = None) -> None:
    """Write ``state`` (default: ``llm.save_state()``, an LLM's) to ``path`` atomically."""
    if state is None:
        state = llm.save_state()  # type: ignore[attr-defined]
    logits = (np.zeros(0, np.float32) if state.last_logits is None
              else np.ascontiguousarray(state.last_logits, dtype=np.float32))
    blob_logits = logits.tobytes()
    header = {
        "model": llm.model_identity,
        "kv_type": llm.kv_type,
        "lora": [list(x) for x in state.lora],
        "tokens": list(state.tokens),
        "kv_bytes": len(state.kv),
        "kv_sha256": hashlib.sha256(state.kv).hexdigest(),
        "logits": int(logits.size),
        "logits_sha256": hashlib.sha256(blob_logits).hexdigest(),
    }
    head = json.dumps(header).encode()
    with atomic_output(path, error=StateFileError) as f:
        f.write(MAGIC + struct.pack("<II", VERSION, len(head)))
        f.write(head)
        f.write(state.kv)
        f.write(blob_logits)


def load_state_file(llm: StateOwner, path: str | os.PathLike[str]) -> LLMState:
    """The state in ``path``, checked against ``llm`` (not loaded into it: see
    :meth:`LLM.load_state`)."""
    from pyllm.runtime.llm import LLMState

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise StateFileError(f"cannot read state file {path}: {e.strerror}") from None
    fixed = len(MAGIC) + 8
    if len(data) < fixed or data[:len(MAGIC)] != MAGIC:
        raise StateFileError(f"{path} is not a pyllm state file")
    version, n_head = struct.unpack_from("<II", data, len(MAGIC))
    if version != VERSION:
        raise StateFileError(f"{path} is a state file of format version {version}; this pyllm "
                             f"reads version {VERSION}")
    if n_head > MAX_HEADER or fixed + n_head > len(data):
        raise StateFileError(f"{path} is truncated (its header is cut)")
    try:
        header = json.loads(data[fixed:fixed + n_head])
        model, kv_type = str(header["model"]), str(header["kv_type"])
        lora = tuple((str(p), float(s)) for p, s in header["lora"])
        tokens = tuple(int(t) for t in header["tokens"])
        n_kv, n_logits = int(header["kv_bytes"]), int(header["logits"])
        sums = (str(header["kv_sha256"]), str(header["logits_sha256"]))
    except (ValueError, KeyError, TypeError) as e:
        raise StateFileError(f"{path} has a corrupt header ({e})") from None
    if model != llm.model_identity:
        raise StateFileError(f"{path} was saved from another model than "
                             f"{Path(llm.model_path).name}")
    if kv_type != llm.kv_type:
        raise StateFileError(f"{path} was saved with KV cache type {kv_type}; this context "
                             f"uses {llm.kv_type}")
    start = fixed + n_head
    if n_kv < 0 or n_logits < 0 or start + n_kv + 4 * n_logits != len(data):
        raise StateFileError(f"{path} is truncated or has extra bytes (expected "
                             f"{start + max(n_kv, 0) + 4 * max(n_logits, 0)}, found {len(data)})")
    kv = data[start:start + n_kv]
    blob_logits = data[start + n_kv:]
    if (hashlib.sha256(kv).hexdigest(), hashlib.sha256(blob_logits).hexdigest()) != sums:
        raise StateFileError(f"{path} is corrupt (its checksums do not match)")
    if len(tokens) > llm.n_ctx:
        raise StateFileError(f"{path} holds {len(tokens)} tokens; this context holds "
                             f"{llm.n_ctx}")
    if any(not 0 <= t < llm.n_vocab for t in tokens):
        raise StateFileError(f"{path} holds token ids outside the vocabulary")
    logits = np.frombuffer(blob_logits, dtype=np.float32).copy() if n_logits else None
    return LLMState(tokens, bytes(kv), logits, lora)


__all__ = ["MAGIC", "VERSION", "StateOwner", "load_state_file", "save_state_file"]
