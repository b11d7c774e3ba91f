"""Hugging Face tensor names -> GGUF tensor names, and the per-tensor transforms on the way.

Owns: which checkpoint tensors belong to which GGUF tensor for each supported architecture, the
q/k row permutation that llama-arch GGUF files expect, InternLM2's fused-wqkv split, and the rule
for which tensors keep F32 when writing a 16-bit file. Names follow llama.cpp's tensor mapping
(gguf-py ``tensor_mapping``) so the files load in llama.cpp too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from pyllm.errors import ConvertError

# HF `architectures[0]` -> GGUF `general.architecture`
HF_ARCHS: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "LLaMAForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "InternLM2ForCausalLM": "internlm2",
}

# Architectures whose GGUF q/k rows are permuted so that the "normal" RoPE (adjacent pairs)
# gives what HF's rotate_half (pairs i, i + d/2) gives on the original rows. qwen2 files keep
# HF's order and are run with NeoX-style RoPE instead.
PERMUTED_QK_ARCHS = frozenset({"llama", "internlm2"})

# Per-architecture name tables: (HF regex, GGUF template). {bid} is the block index.
_LLAMA_LIKE: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "blk.{bid}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", "blk.{bid}.attn_q.{kind}"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", "blk.{bid}.attn_k.{kind}"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", "blk.{bid}.attn_v.{kind}"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", "blk.{bid}.attn_output.{kind}"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{bid}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.(weight|bias)", "blk.{bid}.ffn_gate.{kind}"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.(weight|bias)", "blk.{bid}.ffn_up.{kind}"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.(weight|bias)", "blk.{bid}.ffn_down.{kind}"),
]

_INTERNLM2: list[tuple[str, str]] = [
    (r"model\.tok_embeddings\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"output\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.attention_norm\.weight", "blk.{bid}.attn_norm.weight"),
    # the fused projection is split into attn_q/attn_k/attn_v (see split_internlm2_wqkv)
    (r"model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)", "blk.{bid}.attn_qkv.{kind}"),
    (r"model\.layers\.(\d+)\.attention\.wo\.(weight|bias)", "blk.{bid}.attn_output.{kind}"),
    (r"model\.layers\.(\d+)\.ffn_norm\.weight", "blk.{bid}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.feed_forward\.w1\.(weight|bias)", "blk.{bid}.ffn_gate.{kind}"),
    (r"model\.layers\.(\d+)\.feed_forward\.w3\.(weight|bias)", "blk.{bid}.ffn_up.{kind}"),
    (r"model\.layers\.(\d+)\.feed_forward\.w2\.(weight|bias)", "blk.{bid}.ffn_down.{kind}"),
]

_TABLES: dict[str, list[tuple[re.Pattern[str], str]]] = {
    arch: [(re.compile(rx), tmpl) for rx, tmpl in table]
    for arch, table in (("llama", _LLAMA_LIKE), ("qwen2", _LLAMA_LIKE), ("internlm2", _INTERNLM2))
}

# Checkpoint entries that carry no weights (buffers old transformers versions saved).
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$|.*\.attention\.rotary_emb\..*$")


@dataclass(frozen=True)
class MappedName:
    gguf: str  # GGUF tensor name ("blk.3.attn_qkv.weight" is split later for internlm2)
    block: int | None  # block index, or None for global tensors


def map_name(arch: str, hf_name: str) -> MappedName | None:
    """GGUF name for a checkpoint tensor; None for entries that hold no weights.

    Unknown names are an error rather than silently dropped: a tensor we do not understand means
    the model is not the architecture we think it is.
    """
    if _IGNORED.match(hf_name):
        return None
    for rx, tmpl in _TABLES[arch]:
        m = rx.fullmatch(hf_name)
        if m is None:
            continue
        groups = m.groups()
        bid = int(groups[0]) if groups and groups[0].isdigit() else None
        kind = groups[-1] if groups and groups[-1] in ("weight", "bias") else "weight"
        return MappedName(tmpl.format(bid=bid, kind=kind), bid)
    raise ConvertError(f"unexpected tensor {hf_name!r} for architecture {arch}")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from HF's half-split rotary layout to interleaved pairs.

    HF rotates dimension i with i + hd/2; llama-arch GGUF files rotate 2i with 2i+1. Within a head,
    output row 2i takes HF row i and row 2i+1 takes HF row i + hd/2. Works for weights (rows, in)
    and biases (rows,).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ConvertError(f"cannot split {rows} rows into {n_head} heads of even size")
    hd = rows // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def split_internlm2_wqkv(
    w: np.ndarray, n_head: int, n_head_kv: int, head_dim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """InternLM2's fused projection -> (q, k, v) rows.

    Its rows are grouped per kv head: ``n_head / n_head_kv`` query heads, then that group's key
    head, then its value head, each ``head_dim`` rows.
    """
    group = n_head // n_head_kv
    expect = n_head_kv * (group + 2) * head_dim
    if w.shape[0] != expect:
        raise ConvertError(f"wqkv has {w.shape[0]} rows, expected {expect}")
    tail = w.shape[1:]
    g = w.reshape(n_head_kv, group + 2, head_dim, *tail)
    q = g[:, :group].reshape(n_head * head_dim, *tail)
    k = g[:, group].reshape(n_head_kv * head_dim, *tail)
    v = g[:, group + 1].reshape(n_head_kv * head_dim, *tail)
    return q, k, v


def keeps_f32(gguf_name: str, ndim: int) -> bool:
    """Tensors written as F32 whatever the output type (as llama.cpp does): 1-D ones (norms,
    biases) and the RoPE frequency factors -- tiny, and precision-sensitive."""
    return ndim <= 1 or gguf_name == "rope_freqs.weight"
