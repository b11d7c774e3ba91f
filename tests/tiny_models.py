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
    # The 2-D matrices as random valid blocks of wtype instead of quantized Gaussian ones: for
    # the types pyllm cannot quantize to (the grid i-quants), see random_blocks.
    random_blocks: bool = False
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


# Byte offset of the f16 d in the blocks random_blocks writes (IQ1_M has none: see _set_iq1m_d).
_D_OFFSET = {
    GGMLType.IQ2_XXS: 0, GGMLType.IQ2_XS: 0, GGMLType.IQ2_S: 0, GGMLType.IQ3_XXS: 0,
    GGMLType.IQ3_S: 0, GGMLType.IQ1_S: 0, GGMLType.TQ1_0: 52, GGMLType.TQ2_0: 64,
}  # fmt: skip


def _set_iq1m_d(raw: np.ndarray, d: np.ndarray) -> None:
    """IQ1_M keeps its f16 d in the top nibbles of its four uint16 scale words (bytes 48..55):
    nibble w of d in word w."""
    h = np.asarray(d, np.float16).reshape(-1).view(np.uint16)
    words = raw[:, 48:56].copy().view(np.uint16)
    for w in range(4):
        words[:, w] = (words[:, w] & 0x0FFF) | (((h >> (4 * w)) & 0xF) << 12)
    raw[:, 48:56] = words.view(np.uint8)


def _set_d(wtype: GGMLType, raw: np.ndarray, d: np.ndarray) -> None:
    if wtype == GGMLType.IQ1_M:
        _set_iq1m_d(raw, d)
    else:
        off = _D_OFFSET[wtype]
        raw[:, off : off + 2] = np.asarray(d, np.float16).reshape(-1, 1).view(np.uint8)


def random_blocks(
    wtype: GGMLType, rows: int, cols: int, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """A rows x cols matrix of wtype as raw blocks (rows, row_bytes): random code bytes, and each
    block's f16 d set so that the block's RMS is about ``scale`` (x 0.5..1.5, random sign). For
    the grid i-quants at scale 0.2 that is |d| ~ 1e-3..1e-2 (IQ1: ~0.05), as in real files."""
    from pyllm.formats import qtypes

    info = qtypes.type_info(wtype)
    n = rows * cols // info.block_size
    raw = rng.integers(0, 256, (n, info.type_size), dtype=np.uint8)
    _set_d(wtype, raw, np.ones(n))
    unit = qtypes.dequantize(wtype, raw, (n, info.block_size)).astype(np.float64)
    rms = np.sqrt(np.mean(unit**2, axis=1))  # each block's RMS at d = 1
    target = scale * rng.uniform(0.5, 1.5, n) * rng.choice([-1.0, 1.0], n)
    _set_d(wtype, raw, target / np.maximum(rms, 1e-6))
    return raw.reshape(rows, -1)


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
            if s.random_blocks:  # the Gaussian's scale, random codes
                data = random_blocks(s.wtype, *arr.shape, float(arr.std()), rng)
            else:
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
