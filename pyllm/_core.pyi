"""Type stubs of the compiled extension ``pyllm._core`` (csrc/bindings/).

Written by hand from the pybind11 bindings; tests/test_api_docs.py checks that every public name
(and every method and property of a class) of the built module is here and nothing else is.
Arguments that pybind11 reads through the buffer protocol (``py::buffer``) are typed as
``_BufferLike``: numpy arrays, ``bytes`` and memory-mapped views all qualify.
"""

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

__version__: str

# Weight slot names, in the order Model's tensors / layers dicts are read
MODEL_WEIGHT_SLOTS: tuple[str, ...]
LAYER_WEIGHT_SLOTS: tuple[str, ...]
# Tokens up to which a product uses the decode (matvec) kernels
MATVEC_TOKENS: int
# Bytes of the header that Context.save_state puts before the K/V rows
STATE_HEADER_BYTES: int
DEFAULT_KV_TYPE: KVType

# What pybind11 reads through the buffer protocol; numpy's stubs declare __buffer__ only for
# Python >= 3.12, so arrays are named too
_BufferLike = Buffer | npt.NDArray[Any]
# A (ggml type id, flat uint8 buffer, cols, rows, name in the file) weight of Model
_WeightSpec = tuple[int, _BufferLike, int, int, str]
# (backend, first layer, last layer): one range of a placement
_Range = tuple[str, int, int]

class _PybindEnum:
    """What pybind11 gives every enum: made from and turned into its int, compared, hashed,
    pickled (each enum lists its own members, name and value)."""

    def __init__(self, value: int) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def __ne__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...
    def __index__(self) -> int: ...
    def __int__(self) -> int: ...
    def __getstate__(self) -> int: ...
    def __setstate__(self, state: int) -> None: ...

class RopeScaling(_PybindEnum):
    """RoPE context extension (GGUF rope.scaling.type)."""

    none: ClassVar[RopeScaling]
    linear: ClassVar[RopeScaling]
    yarn: ClassVar[RopeScaling]
    dynamic: ClassVar[RopeScaling]
    __members__: ClassVar[dict[str, RopeScaling]]
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class KVType(_PybindEnum):
    """Element type of the KV cache."""

    f16: ClassVar[KVType]
    q8_0: ClassVar[KVType]
    f32: ClassVar[KVType]
    __members__: ClassVar[dict[str, KVType]]
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class HParams:
    """Hyper-parameters of a Llama-family model (every field read-write)."""

    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_rot: int
    n_ctx_train: int
    rms_eps: float
    rope_base: float
    rope_neox: bool
    rope_scaling: RopeScaling
    rope_factor: float
    rope_orig_ctx: int
    yarn_beta_fast: float
    yarn_beta_slow: float
    yarn_attn_factor: float
    yarn_ext_factor: float
    def __init__(self) -> None: ...

class Model:
    """Llama-family weights (views into the memory-mapped GGUF)."""

    def __init__(
        self,
        hparams: HParams,
        tensors: dict[str, _WeightSpec],
        layers: list[dict[str, _WeightSpec]],
        repack: bool = False,
        release_source: bool = False,
        n_threads: int = 0,
        placement: Sequence[_Range] = [],
        repack_image: _BufferLike | None = None,
        repack_image_plan: int = 0,
        embedding_file: tuple[int, int] | None = None,
    ) -> None: ...
    @property
    def placement(self) -> list[_Range]: ...
    @property
    def repacked_bytes(self) -> int: ...
    # (view of the CPU's rows16 copies, their plan, reused) or None when nothing was repacked;
    # the view is valid only while this model lives
    def repack_image(self) -> tuple[memoryview, int, bool] | None: ...
    @property
    def n_vocab(self) -> int: ...
    @property
    def n_embd(self) -> int: ...
    @property
    def n_layer(self) -> int: ...

class Context:
    """KV cache + forward pass; not thread-safe (one per thread)."""

    def __init__(
        self,
        model: Model,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_threads: int = 0,
        kv_type: KVType = ...,
        n_seq: int = 1,
    ) -> None: ...
    # logits="last": (n_vocab,); "all": (n_tokens, n_vocab); "none": None
    def decode(
        self, tokens: npt.ArrayLike, logits: Literal["last", "all", "none"] = "last"
    ) -> npt.NDArray[np.float32] | None: ...
    # decode's "last" without numpy: the logits as n_vocab float32 in a bytearray
    def decode_list(self, tokens: list[int]) -> bytearray: ...
    def decode_batch(
        self, tokens: npt.ArrayLike, seq: npt.ArrayLike, want_logits: npt.ArrayLike
    ) -> npt.NDArray[np.float32]: ...
    def decode_part(
        self,
        tokens: npt.ArrayLike | None,
        hidden: npt.ArrayLike | None,
        seq: npt.ArrayLike,
        want_logits: npt.ArrayLike,
        min_seq_len: int = 0,
    ) -> npt.NDArray[np.float32]: ...
    def check_batch(self, tokens: npt.ArrayLike | None, seq: npt.ArrayLike) -> None: ...
    @property
    def embeds_tokens(self) -> bool: ...
    @property
    def has_head(self) -> bool: ...
    def embed(self, tokens: npt.ArrayLike, seq: int = 0) -> npt.NDArray[np.float32]: ...
    @property
    def n_seq(self) -> int: ...
    def seq_n_past(self, seq: int) -> int: ...
    def seq_truncate(self, seq: int, n: int) -> None: ...
    @property
    def n_past(self) -> int: ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def n_threads(self) -> int: ...
    @property
    def placement(self) -> list[_Range]: ...
    def truncate(self, n: int) -> None: ...
    def seq_shift(self, seq: int, keep: int, n_discard: int) -> None: ...
    def collect_activation_stats(self, on: bool) -> None: ...
    @property
    def collecting_activation_stats(self) -> bool: ...
    # {"layers": [{"attn_in", "attn_out", "ffn_in", "ffn_down": float64 arrays, "n_tokens"}],
    #  "output": float64 array, "n_output"}, or None before any collection
    def activation_stats(self) -> dict[str, Any] | None: ...
    def save_state(self, seq: int = 0) -> bytes: ...
    def load_state(self, state: bytes, seq: int = 0) -> None: ...
    def set_lora_adapters(self, adapters: Sequence[LoraAdapter]) -> None: ...
    def seq_set_lora(self, seq: int, mix: Sequence[tuple[int, float]]) -> None: ...
    def seq_lora(self, seq: int) -> list[tuple[int, float]]: ...

class LoraAdapter:
    """One adapter's low-rank pairs (float32), per layer and block matrix."""

    def __init__(self, n_layer: int) -> None: ...
    def set(
        self, layer: int, slot: str, a: npt.NDArray[Any], b: npt.NDArray[Any], factor: float
    ) -> None: ...
    def set_delta(self, layer: int, slot: str, values: npt.ArrayLike) -> None: ...
    @property
    def has_deltas(self) -> bool: ...
    @property
    def n_layer(self) -> int: ...
    @property
    def max_rank(self) -> int: ...
    @property
    def nbytes(self) -> int: ...

class SamplerParams:
    """Raw sampler settings; pyllm.runtime.sampling.SamplingParams fills them."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    typical_p: float
    tfs_z: float
    repeat_penalty: float
    repeat_last_n: int
    presence_penalty: float
    frequency_penalty: float
    mirostat: int
    mirostat_tau: float
    mirostat_eta: float
    seed: int
    logit_bias: list[tuple[int, float]]
    def __init__(self) -> None: ...

# (id, logprob) pairs, most probable first
_TopLogprobs = list[tuple[int, float]]

class Sampler:
    """llama.cpp-compatible sampler chain over one logits row."""

    def __init__(self, params: SamplerParams, n_vocab: int) -> None: ...
    # mask: the allowed tokens as uint32 bit words (a grammar's), or None
    def sample(self, logits: _BufferLike, mask: _BufferLike | None = None) -> int: ...
    def sample_with_info(
        self, logits: _BufferLike, top_n: int, mask: _BufferLike | None = None
    ) -> tuple[int, float, _TopLogprobs, float, _TopLogprobs]: ...
    def candidates(
        self, logits: _BufferLike, mask: _BufferLike | None = None
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]: ...
    def accept(self, token: int) -> None: ...
    def accept_many(self, tokens: Sequence[int]) -> None: ...
    def reset(self) -> None: ...
    @property
    def seed(self) -> int: ...
    @property
    def mu(self) -> float: ...
    @property
    def n_vocab(self) -> int: ...
    @property
    def history_size(self) -> int: ...

def raw_logprobs(logits: _BufferLike, token: int, top_n: int) -> tuple[float, _TopLogprobs]: ...

# the build and the CPU
def backends() -> list[str]: ...
# glibc's malloc_trim: free pages back to the system; True when some were
def trim_heap() -> bool: ...
def devices() -> list[dict[str, Any]]: ...
def compiled_isas() -> list[str]: ...
def available_isas() -> list[str]: ...
def active_isa() -> str: ...
def set_active_isa(arg0: str) -> None: ...
def matmat_min_tokens() -> int: ...
def cpu_features() -> dict[str, bool | int]: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...

# kernels (tests and tools)
def matmul(
    qtype: int,
    w: npt.NDArray[Any],
    n_out: int,
    k: int,
    x: npt.NDArray[Any],
    rows16: bool = False,
) -> npt.NDArray[np.float32]: ...
def repack_roundtrip(
    qtype: int, w: npt.ArrayLike, n_out: int, k: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]: ...
def swiglu(gate: npt.ArrayLike, up: npt.ArrayLike) -> npt.NDArray[np.float32]: ...
def kernel_table(isa: str) -> dict[int, tuple[str, ...]]: ...

# quant formats
def dequantize(qtype: int, data: _BufferLike, n: int) -> npt.NDArray[np.float32]: ...
def quantize(qtype: int, data: _BufferLike) -> npt.NDArray[np.uint8]: ...
def quantize_weighted(
    qtype: int, data: _BufferLike, weights: _BufferLike
) -> npt.NDArray[np.uint8]: ...
def type_traits(qtype: int) -> dict[str, Any]: ...
def quant_type_ids() -> list[int]: ...

# GGUF reading: count strings from byte pos, (strings, end position), or None past the end
def gguf_string_array(buf: _BufferLike, pos: int, count: int) -> tuple[list[str], int] | None: ...
# ... the end position of count strings (nothing decoded), or None past the end
def gguf_string_array_end(buf: _BufferLike, pos: int, count: int) -> int | None: ...
# ... the position of each string (bytes of u64), or None past the end
def gguf_string_offsets(buf: _BufferLike, pos: int, count: int) -> bytes | None: ...
# ... the first index whose bytes are text (-1: none), or None past the end
def gguf_string_find(buf: _BufferLike, pos: int, count: int, text: bytes) -> int | None: ...
# ... (earlier index, index) of the first repeated string, or None (none, or past the end)
def gguf_string_duplicate(buf: _BufferLike, pos: int, count: int) -> tuple[int, int] | None: ...

class BpePairs:
    """A byte-level BPE merge table: left * stride + right -> rank * stride + merged."""

    def __getitem__(self, key: int) -> int: ...  # -1: the pair does not merge
    def get(self, key: int, default: int | None = None) -> int | None: ...
    def __len__(self) -> int: ...
    def items(self) -> list[tuple[int, int]]: ...
    # a pre-token's symbol ids after merging its UTF-8 bytes; the work is added to counter[0]
    def merge_short(self, raw: bytes, counter: list[int]) -> tuple[int, ...]: ...

# BPE: the merge table from the tokens and merges (each a list, or a GGUF string array's
# (buffer, pos, count)): (table, byte ids, extra texts, stride), or None (the Python path)
def bpe_pair_table(
    tokens: list[str] | tuple[_BufferLike, int, int],
    merges: list[str] | tuple[_BufferLike, int, int],
    byte_chars: list[str],
) -> tuple[BpePairs, list[int], list[str], int] | None: ...
