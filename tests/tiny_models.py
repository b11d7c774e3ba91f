"""Small random-weight Llama-family GGUF files written by the tests themselves."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pyllm.formats.gguf import GGMLType, GGUFWriter, ValueType


@dataclass
class TinySpec:
    arch: str = "llama"
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int | None = None
    n_ff: int = 96
    n_vocab: int = 160
    n_rot: int | None = None
    tied: bool = False
    biases: bool = False
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    ctx: int = 256
    rope_scaling: dict[str, object] = field(default_factory=dict)  # type/factor/orig ctx
    rope_freqs: bool = False
    wtype: GGMLType = GGMLType.F32  # type of the 2-D matrices
    seed: int = 0


def _quantize(arr: np.ndarray, wtype: GGMLType) -> np.ndarray:
    if wtype == GGMLType.F32:
        return arr.astype(np.float32)
    if wtype == GGMLType.F16:
        return arr.astype(np.float16)
    if wtype == GGMLType.BF16:
        from pyllm.formats import qtypes

        return qtypes.quantize(wtype, arr.astype(np.float32)).view(np.uint16)
    from pyllm.formats import qtypes

    return qtypes.quantize(wtype, arr.astype(np.float32))


def write_tiny(path: Path, spec: TinySpec | None = None) -> Path:
    s = spec or TinySpec()
    rng = np.random.default_rng(s.seed)
    hd = s.head_dim or s.n_embd // s.n_head
    n_rot = s.n_rot or hd
    w = GGUFWriter(path)
    a = s.arch
    w.add_kv("general.architecture", a)
    w.add_kv("general.name", f"tiny-{a}")
    w.add_kv(f"{a}.block_count", s.n_layer)
    w.add_kv(f"{a}.context_length", s.ctx)
    w.add_kv(f"{a}.embedding_length", s.n_embd)
    w.add_kv(f"{a}.feed_forward_length", s.n_ff)
    w.add_kv(f"{a}.attention.head_count", s.n_head)
    w.add_kv(f"{a}.attention.head_count_kv", s.n_head_kv)
    if s.head_dim:
        w.add_kv(f"{a}.attention.key_length", hd)
        w.add_kv(f"{a}.attention.value_length", hd)
    w.add_kv(f"{a}.rope.dimension_count", n_rot)
    w.add_kv(f"{a}.rope.freq_base", s.rope_base)
    w.add_kv(f"{a}.attention.layer_norm_rms_epsilon", s.rms_eps)
    for key, value in s.rope_scaling.items():
        w.add_kv(f"{a}.rope.scaling.{key}", value,
                 ValueType.FLOAT32 if isinstance(value, float) else None)

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def add(name: str, arr: np.ndarray, quantize: bool) -> None:
        if quantize and arr.ndim == 2:
            data = _quantize(arr, s.wtype)
            w.add_tensor(name, data, s.wtype, dims=(arr.shape[1], arr.shape[0]))
        else:
            w.add_tensor(name, arr.astype(np.float32))

    d, q_dim, kv_dim = s.n_embd, s.n_head * hd, s.n_head_kv * hd
    add("token_embd.weight", mat(s.n_vocab, d, 0.5), True)
    add("output_norm.weight", 1.0 + 0.1 * rng.standard_normal(d).astype(np.float32), False)
    if not s.tied:
        add("output.weight", mat(s.n_vocab, d, 0.2), True)
    if s.rope_freqs:
        add("rope_freqs.weight", rng.uniform(1.0, 8.0, n_rot // 2).astype(np.float32), False)
    for i in range(s.n_layer):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", 1.0 + 0.1 * rng.standard_normal(d).astype(np.float32), False)
        add(p + "attn_q.weight", mat(q_dim, d, 0.25), True)
        add(p + "attn_k.weight", mat(kv_dim, d, 0.25), True)
        add(p + "attn_v.weight", mat(kv_dim, d, 0.25), True)
        add(p + "attn_output.weight", mat(d, q_dim, 0.15), True)
        if s.biases:
            add(p + "attn_q.bias", 0.1 * rng.standard_normal(q_dim).astype(np.float32), False)
            add(p + "attn_k.bias", 0.1 * rng.standard_normal(kv_dim).astype(np.float32), False)
            add(p + "attn_v.bias", 0.1 * rng.standard_normal(kv_dim).astype(np.float32), False)
        add(p + "ffn_norm.weight", 1.0 + 0.1 * rng.standard_normal(d).astype(np.float32), False)
        add(p + "ffn_gate.weight", mat(s.n_ff, d, 0.2), True)
        add(p + "ffn_up.weight", mat(s.n_ff, d, 0.2), True)
        add(p + "ffn_down.weight", mat(d, s.n_ff, 0.15), True)
    w.write()
    return path
