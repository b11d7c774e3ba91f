"""A small, readable numpy forward pass of the Llama family: the oracle for the C++ forward.

It reads a GGUF through :class:`pyllm.formats.gguf.GGUFReader`, dequantizes each weight with the
``gguf`` package (an implementation independent of ours) and runs the whole sequence at once
with a causal mask, so ``forward(tokens)[i]`` are the logits after ``tokens[: i + 1]`` -- what a
KV-cached runtime produces token by token. Written for clarity, not speed (llama2.c style: every
tensor is commented with its shape).

Architectures (as llama.cpp defines them):
  * ``llama``     -- also Mistral, SmolLM2, ...; q/k weights are stored permuted so that the
                     "normal" RoPE (rotating adjacent pairs (2i, 2i+1)) applies;
  * ``internlm2`` -- same graph and tensor names as llama (llama.cpp's converter splits the fused
                     wqkv and permutes q/k like llama);
  * ``qwen2``     -- q/k/v biases and NeoX RoPE (rotating pairs (i, i + d/2)), weights unpermuted.
Any of them may carry q/k/v/o biases; GQA/MQA (n_head_kv divides n_head), tied embeddings (no
``output.weight``), any head_dim (``attention.key_length``/``value_length``), partial rotary
(``rope.dimension_count`` < head_dim), and RoPE scaling: linear, YaRN, dynamic NTK and Llama-3
frequency factors (``rope_freqs.weight``).

Names used in comments: T tokens, D = n_embd, H = n_head, Hkv = n_head_kv, hd = head_dim (k),
hv = head_dim (v), F = n_ff, V = n_vocab, R = rope dimension count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyllm.errors import ModelError
from pyllm.formats.gguf import GGMLType, GGUFReader, TensorInfo

SUPPORTED_ARCHS = ("llama", "qwen2", "internlm2")
NEOX_ARCHS = ("qwen2",)  # architectures whose RoPE rotates halves instead of adjacent pairs


def dequantize_tensor(t: TensorInfo, dtype: Any = np.float64) -> np.ndarray:
    """Any GGUF tensor -> float array in numpy shape (outermost first)."""
    if t.type == GGMLType.F32:
        a = np.asarray(t.data)
    elif t.type == GGMLType.F16:
        a = t.data.astype(np.float32)
    elif t.type == GGMLType.BF16:
        # bf16 is the top half of an f32: shift the 16 stored bits up
        a = (t.data.astype(np.uint32) << 16).view(np.float32)
    else:
        from gguf.quants import GGMLQuantizationType, dequantize

        a = dequantize(np.asarray(t.data), GGMLQuantizationType(int(t.type))).reshape(t.shape)
    return a.astype(dtype, copy=False)


@dataclass
class RefParams:
    """Hyper-parameters of one file, read from its metadata with llama.cpp's defaults."""

    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int  # of q and k
    head_dim_v: int
    rms_eps: float
    rope_dim: int
    rope_base: float
    rope_neox: bool
    scaling_type: str  # "none" | "linear" | "yarn" | "dynamic"
    scaling_factor: float
    orig_ctx: int  # context length the model was trained with (YaRN / dynamic NTK)
    yarn_beta_fast: float
    yarn_beta_slow: float
    yarn_attn_factor: float

    @classmethod
    def from_reader(cls, r: GGUFReader) -> RefParams:
        return cls.from_metadata(r.metadata, int(r.tensor("token_embd.weight").shape[0]))

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], n_vocab: int) -> RefParams:
        arch = md.get("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise ModelError(f"reference forward: unsupported architecture {arch!r}")

        def kv(key: str, default: Any = None) -> Any:
            value = md.get(f"{arch}.{key}", default)
            if value is None:
                raise ModelError(f"reference forward: missing {arch}.{key}")
            return value

        n_embd = int(kv("embedding_length"))
        n_head = int(kv("attention.head_count"))
        n_head_kv = int(kv("attention.head_count_kv", n_head))
        head_dim = int(kv("attention.key_length", n_embd // n_head))
        n_ctx_train = int(kv("context_length", 2048))
        scaling_type = str(kv("rope.scaling.type", "none"))
        factor = float(kv("rope.scaling.factor", 1.0))
        legacy_linear = md.get(f"{arch}.rope.scale_linear")  # older files: linear factor only
        if scaling_type == "none" and legacy_linear is not None and float(legacy_linear) != 1.0:
            scaling_type, factor = "linear", float(legacy_linear)
        if scaling_type not in ("none", "linear", "yarn", "dynamic"):
            raise ModelError(f"reference forward: unsupported rope scaling {scaling_type!r}")
        if n_head % n_head_kv:
            raise ModelError(f"n_head {n_head} is not a multiple of n_head_kv {n_head_kv}")
        return cls(
            arch=arch,
            n_vocab=n_vocab,
            n_embd=n_embd,
            n_layer=int(kv("block_count")),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            head_dim_v=int(kv("attention.value_length", head_dim)),
            rms_eps=float(kv("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_dim=int(kv("rope.dimension_count", head_dim)),
            rope_base=float(kv("rope.freq_base", 10000.0)),
            rope_neox=arch in NEOX_ARCHS,
            scaling_type=scaling_type,
            scaling_factor=factor if factor > 0 else 1.0,
            orig_ctx=int(kv("rope.scaling.original_context_length", n_ctx_train)),
            yarn_beta_fast=float(kv("rope.scaling.yarn_beta_fast", 32.0)),
            yarn_beta_slow=float(kv("rope.scaling.yarn_beta_slow", 1.0)),
            yarn_attn_factor=float(kv("rope.scaling.yarn_attn_factor", 1.0)),
        )


def rope_inv_freq(
    p: RefParams, n_pos: int, freq_factors: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """Per-pair angular speeds and the cos/sin magnitude for a sequence of ``n_pos`` positions.

    Returns ``(inv_freq (R/2,), mscale)``: pair i of a head at position t rotates by
    ``t * inv_freq[i]`` and cos/sin are multiplied by ``mscale``.
    """
    R = p.rope_dim
    i = np.arange(R // 2, dtype=np.float64)  # (R/2,) pair index
    base = p.rope_base
    if p.scaling_type == "dynamic" and n_pos > p.orig_ctx:
        # dynamic NTK: stretch the base once the sequence is longer than the training context
        # (transformers' rule; the base depends on the longest position of the sequence)
        f = p.scaling_factor
        base = base * ((f * n_pos / p.orig_ctx) - (f - 1.0)) ** (R / (R - 2))
    inv_freq = base ** (-2.0 * i / R)  # (R/2,)
    mscale = 1.0
    if p.scaling_type == "linear":
        inv_freq = inv_freq / p.scaling_factor
    elif p.scaling_type == "yarn":
        # Interpolate (divide by factor) the slow pairs, keep the fast ones, ramp in between.
        # corr_dim(b): the pair index whose wavelength fits b times into the original context.
        def corr_dim(n_rot: float) -> float:
            return R * math.log(p.orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(p.rope_base))

        low = max(0.0, math.floor(corr_dim(p.yarn_beta_fast)))
        high = min(R - 1.0, math.ceil(corr_dim(p.yarn_beta_slow)))
        ramp = np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)  # (R/2,) 0 = fast pairs
        extrapolate = 1.0 - ramp  # weight of the unscaled frequency
        inv_freq = inv_freq / p.scaling_factor * ramp + inv_freq * extrapolate
        if p.scaling_factor > 1.0:
            mscale = p.yarn_attn_factor * (1.0 + 0.1 * math.log(p.scaling_factor))
        else:
            mscale = p.yarn_attn_factor
    if freq_factors is not None:  # Llama 3.1 style: one divisor per pair
        inv_freq = inv_freq / freq_factors.astype(np.float64).reshape(R // 2)
    return inv_freq, mscale


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    # x (T, D), w (D,) -> (T, D)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> np.ndarray:
    """Rotate the first R dims of every head. x (T, nh, hd); cos, sin (T, R/2)."""
    R = cos.shape[1] * 2
    out = x.copy()
    c = cos[:, None, :]  # (T, 1, R/2)
    s = sin[:, None, :]
    if neox:  # pair i is (i, i + R/2)
        a, b = x[..., : R // 2], x[..., R // 2 : R]  # (T, nh, R/2) each
        out[..., : R // 2] = a * c - b * s
        out[..., R // 2 : R] = a * s + b * c
    else:  # pair i is (2i, 2i + 1)
        a, b = x[..., 0:R:2], x[..., 1:R:2]  # (T, nh, R/2) each
        out[..., 0:R:2] = a * c - b * s
        out[..., 1:R:2] = a * s + b * c
    return out


class LlamaRef:
    """``LlamaRef(path).forward(tokens)`` -> logits (T, V) for every position.

    ``dtype`` is the compute type (float64 by default). Weights are dequantized when used and
    not kept, so memory stays near one layer's worth plus the embeddings.
    """

    def __init__(self, path: str, dtype: Any = np.float64) -> None:
        self.reader = GGUFReader(path)
        self.params = RefParams.from_reader(self.reader)
        self.dtype = dtype

    def w(self, name: str) -> np.ndarray:
        return dequantize_tensor(self.reader.tensor(name), self.dtype)

    def w_opt(self, name: str) -> np.ndarray | None:
        return self.w(name) if self.reader.has_tensor(name) else None

    def forward(
        self, tokens: Sequence[int], trace: dict[str, np.ndarray] | None = None
    ) -> np.ndarray:
        """Logits (T, V). If ``trace`` is a dict, named intermediates are stored in it."""
        p = self.params
        toks = np.asarray(tokens, dtype=np.int64)  # (T,)
        T = toks.shape[0]
        if T == 0 or toks.min() < 0 or toks.max() >= p.n_vocab:
            raise ModelError(f"tokens must be non-empty and in [0, {p.n_vocab})")
        H, Hkv, hd, hv = p.n_head, p.n_head_kv, p.head_dim, p.head_dim_v
        group = H // Hkv  # query heads sharing one kv head

        def keep(name: str, a: np.ndarray) -> None:
            if trace is not None:
                trace[name] = a.copy()

        # token embeddings: dequantize only the rows we need
        emb = self.reader.tensor("token_embd.weight")
        x = dequantize_rows(emb, toks, self.dtype)  # (T, D)
        keep("inp_embd", x)

        # rotary angles for positions 0..T-1
        inv_freq, mscale = rope_inv_freq(p, T, self.w_opt("rope_freqs.weight"))  # (R/2,)
        angles = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]  # (T, R/2)
        cos = (np.cos(angles) * mscale).astype(self.dtype)  # (T, R/2)
        sin = (np.sin(angles) * mscale).astype(self.dtype)  # (T, R/2)

        causal = np.triu(np.ones((T, T), dtype=bool), k=1)  # (T, T) True above the diagonal
        for layer in range(p.n_layer):
            b = f"blk.{layer}."

            # ---- attention ----
            h = rms_norm(x, self.w(b + "attn_norm.weight"), p.rms_eps)  # (T, D)
            q = self.linear(h, b + "attn_q")  # (T, H*hd)
            k = self.linear(h, b + "attn_k")  # (T, Hkv*hd)
            v = self.linear(h, b + "attn_v")  # (T, Hkv*hv)
            q = apply_rope(q.reshape(T, H, hd), cos, sin, p.rope_neox)  # (T, H, hd)
            k = apply_rope(k.reshape(T, Hkv, hd), cos, sin, p.rope_neox)  # (T, Hkv, hd)
            v = v.reshape(T, Hkv, hv)  # (T, Hkv, hv)
            keep(b + "q_rope", q)
            keep(b + "k_rope", k)

            k = np.repeat(k, group, axis=1)  # (T, H, hd): head j reads kv head j // group
            v = np.repeat(v, group, axis=1)  # (T, H, hv)
            scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)  # (H, T, T)
            scores = np.where(causal[None], -np.inf, scores)
            scores = scores - scores.max(axis=-1, keepdims=True)
            att = np.exp(scores)
            att = att / att.sum(axis=-1, keepdims=True)  # (H, T, T) rows sum to 1
            o = np.einsum("hqk,khd->qhd", att, v).reshape(T, H * hv)  # (T, H*hv)
            x = x + self.linear(o, b + "attn_output")  # (T, D)
            keep(b + "attn_out", x)

            # ---- feed-forward (SwiGLU) ----
            h = rms_norm(x, self.w(b + "ffn_norm.weight"), p.rms_eps)  # (T, D)
            g = silu(self.linear(h, b + "ffn_gate")) * self.linear(h, b + "ffn_up")  # (T, F)
            x = x + self.linear(g, b + "ffn_down")  # (T, D)
            keep(b + "l_out", x)

        x = rms_norm(x, self.w("output_norm.weight"), p.rms_eps)  # (T, D)
        keep("result_norm", x)
        out_name = "output" if self.reader.has_tensor("output.weight") else "token_embd"
        logits = x @ self.w(out_name + ".weight").T  # (T, V); tied: reuse the embeddings
        return logits

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        """x (T, in) @ W.T (+ bias) with W stored (out, in) in numpy order."""
        y = x @ self.w(name + ".weight").T  # (T, out)
        bias = self.w_opt(name + ".bias")
        return y + bias if bias is not None else y


def dequantize_rows(t: TensorInfo, rows: np.ndarray, dtype: Any) -> np.ndarray:
    """Rows ``rows`` of a 2-D tensor, dequantized: (len(rows), t.shape[1])."""
    if t.type in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        return dequantize_tensor(t, dtype)[rows]
    from gguf.quants import GGMLQuantizationType, dequantize

    packed = np.asarray(t.data)[rows]  # (n, row_bytes)
    a = dequantize(packed, GGMLQuantizationType(int(t.type)))  # (n, D)
    return a.astype(dtype, copy=False)
