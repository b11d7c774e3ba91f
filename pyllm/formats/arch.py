"""Architectures: GGUF metadata -> hyper-parameters, and the tensors each layer needs.

Supported: ``llama`` (Llama 1/2/3/3.x, CodeLlama, Mistral, Yi, DeepSeek, SmolLM2, ...), ``qwen2``
(q/k/v biases, NeoX-style RoPE) and ``internlm2`` (converted to the llama tensor names by GGUF
converters). Everything is validated here, in Python, before any pointer reaches C++.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from pyllm.errors import ModelError
from pyllm.formats.gguf import TensorInfo
from pyllm.formats.gguf.split import ModelFile
from pyllm.formats.qtypes import weight_types

SUPPORTED_ARCHS = ("llama", "qwen2", "internlm2")
NEOX_ARCHS = frozenset({"qwen2"})

# GGUF rope.scaling.type values; they are the member names of pyllm._core.RopeScaling, which
# HParams.to_core hands to C++ (tests/test_model.py checks that the two lists agree).
ROPE_SCALING = ("none", "linear", "yarn", "dynamic")

# The GGUF tensor names are spelled here and nowhere else: each maps to the slot of the C++
# ModelWeights / LayerWeights that holds it (pyllm._core.MODEL_WEIGHT_SLOTS / LAYER_WEIGHT_SLOTS;
# tests/test_model.py checks that the slots are the C++ ones).
MODEL_TENSORS = {"token_embd.weight": "tok_embd", "output_norm.weight": "output_norm"}
OPTIONAL_MODEL_TENSORS = {
    "output.weight": "output",  # absent: tied to the embeddings
    "rope_freqs.weight": "rope_freqs",  # Llama-3.1 frequency factors
}
LAYER_TENSORS = {
    "attn_norm.weight": "attn_norm", "attn_q.weight": "wq", "attn_k.weight": "wk",
    "attn_v.weight": "wv", "attn_output.weight": "wo", "ffn_norm.weight": "ffn_norm",
    "ffn_gate.weight": "w_gate", "ffn_up.weight": "w_up", "ffn_down.weight": "w_down",
}
OPTIONAL_LAYER_TENSORS = {
    "attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv", "attn_output.bias": "bo",
    "ffn_gate.bias": "b_gate", "ffn_up.bias": "b_up", "ffn_down.bias": "b_down",
}

# (ggml type id, flat byte view, cols, rows, name in the file): one weight as C++ takes it
TensorSpec = tuple[int, Any, int, int, str]


@dataclass(frozen=True)
class HParams:
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
    rope_scaling: str = "none"  # one of ROPE_SCALING
    rope_factor: float = 1.0
    rope_orig_ctx: int = 0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_attn_factor: float = 1.0
    yarn_ext_factor: float = -1.0

    def to_core(self, core: Any) -> Any:
        """The same fields as a ``core.HParams`` (the bound C++ struct), in one loop.

        Enum fields (rope_scaling) go over as the bound C++ enum member of the same name.
        """
        out = core.HParams()
        for f in fields(self):
            value = getattr(self, f.name)
            enum_type = type(getattr(out, f.name))
            if hasattr(enum_type, "__members__"):
                value = enum_type.__members__[value]
            try:
                setattr(out, f.name, value)
            except TypeError:  # e.g. an int metadata value beyond the C++ int
                raise ModelError(f"hyper-parameter {f.name} = {value!r} is out of range") from None
        return out

def _int(md: dict[str, Any], key: str, default: int | None = None) -> int:
    value = md.get(key, default)
    if value is None:
        raise ModelError(f"missing metadata key {key}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ModelError(f"metadata {key} must be an integer, got {value!r}")
    return int(value)


def _float(md: dict[str, Any], key: str, default: float) -> float:
    value = md.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelError(f"metadata {key} must be a finite number, got {value!r}")
    return float(value)


def read_hparams(reader: ModelFile) -> HParams:
    md = reader.fields  # scalars only: no numpy views needed
    arch = md.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelError(f"{reader.path}: no general.architecture in the file")
    if arch not in SUPPORTED_ARCHS:
        raise ModelError(f"unsupported architecture {arch!r} (supported: "
                         f"{', '.join(SUPPORTED_ARCHS)})")
    p = arch + "."
    if not reader.has_tensor("token_embd.weight"):
        raise ModelError("missing tensor token_embd.weight")
    emb = reader.tensor("token_embd.weight")
    if len(emb.dims) != 2:
        raise ModelError("token_embd.weight must be 2-D")
    n_embd = _int(md, p + "embedding_length")
    n_head = _int(md, p + "attention.head_count")
    n_head_kv = _int(md, p + "attention.head_count_kv", n_head)
    if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
        raise ModelError(f"bad head counts: {n_head} heads, {n_head_kv} KV heads")
    head_dim = _int(md, p + "attention.key_length", n_embd // n_head if n_embd % n_head == 0 else 0)
    if head_dim <= 0:
        raise ModelError("head size is not given and n_embd is not divisible by n_head")
    n_rot = _int(md, p + "rope.dimension_count", head_dim)

    scaling_name = md.get(p + "rope.scaling.type", "none")
    factor = _float(md, p + "rope.scaling.factor", 1.0)
    if scaling_name == "none" and p + "rope.scale_linear" in md:  # older files
        scaling_name, factor = "linear", _float(md, p + "rope.scale_linear", 1.0)
    if scaling_name not in ROPE_SCALING:
        raise ModelError(f"unsupported rope scaling type {scaling_name!r}")
    if scaling_name != "none" and factor <= 0:
        raise ModelError(f"rope scaling factor must be > 0, got {factor}")
    if scaling_name != "none" and factor == 1.0:
        scaling_name = "none"

    n_ctx_train = _int(md, p + "context_length", 2048)
    hp = HParams(
        arch=arch,
        n_vocab=int(emb.dims[1]),
        n_embd=n_embd,
        n_layer=_int(md, p + "block_count"),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ff=_int(md, p + "feed_forward_length"),
        n_rot=n_rot,
        n_ctx_train=n_ctx_train,
        rms_eps=_float(md, p + "attention.layer_norm_rms_epsilon", 1e-5),
        rope_base=_float(md, p + "rope.freq_base", 10000.0),
        rope_neox=arch in NEOX_ARCHS,
        rope_scaling=scaling_name,
        rope_factor=factor,
        rope_orig_ctx=_int(md, p + "rope.scaling.original_context_length", n_ctx_train),
        yarn_beta_fast=_float(md, p + "rope.scaling.yarn_beta_fast", 32.0),
        yarn_beta_slow=_float(md, p + "rope.scaling.yarn_beta_slow", 1.0),
        # multiplier of the 1 + 0.1 ln(factor) YaRN magnitude scale (pyllm.tools.convert writes it)
        yarn_attn_factor=_float(md, p + "rope.scaling.yarn_attn_factor", 1.0),
        yarn_ext_factor=_float(md, p + "rope.scaling.yarn_ext_factor", -1.0),
    )
    if hp.n_layer <= 0 or hp.n_layer > 4096:
        raise ModelError(f"bad block count {hp.n_layer}")
    if hp.n_rot <= 0 or hp.n_rot > hp.head_dim or hp.n_rot % 2:
        raise ModelError(f"bad rope dimension count {hp.n_rot} for head size {hp.head_dim}")
    return hp


def _spec(t: TensorInfo) -> TensorSpec:
    """One tensor as the C++ Model expects it; 1-D tensors are one row."""
    if t.type not in weight_types():  # the C++ traits table says which types are weights
        raise ModelError(f"tensor {t.name}: type {t.type.name} is not supported for computation")
    if len(t.dims) > 2:
        raise ModelError(f"tensor {t.name}: expected at most 2 dimensions, got {list(t.dims)}")
    rows = t.dims[1] if len(t.dims) == 2 else 1
    return int(t.type), t.view, int(t.dims[0]), int(rows), t.name


@dataclass(frozen=True)
class ModelTensors:
    """The weights the forward pass reads, by C++ slot: the model-wide ones and one dict per
    layer (``pyllm._core.Model(hparams, tensors.model, tensors.layers)``)."""

    model: dict[str, TensorSpec] = field(default_factory=dict)
    layers: list[dict[str, TensorSpec]] = field(default_factory=list)


def _take(reader: ModelFile, names: dict[str, str], optional: dict[str, str],
          prefix: str = "") -> dict[str, TensorSpec]:
    out: dict[str, TensorSpec] = {}
    for table, required in ((names, True), (optional, False)):
        for name, slot in table.items():
            if reader.has_tensor(prefix + name):
                out[slot] = _spec(reader.tensor(prefix + name))
            elif required:
                raise ModelError(f"missing tensor {prefix + name}")
    return out


def collect_tensors(reader: ModelFile, hp: HParams) -> ModelTensors:
    """The weights of the forward pass; raises ModelError naming a missing or unusable one."""
    return ModelTensors(
        model=_take(reader, MODEL_TENSORS, OPTIONAL_MODEL_TENSORS),
        layers=[_take(reader, LAYER_TENSORS, OPTIONAL_LAYER_TENSORS, f"blk.{i}.")
                for i in range(hp.n_layer)],
    )
