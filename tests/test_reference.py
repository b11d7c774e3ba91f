"""The numpy reference forward (tests/reference) checked on its own: RoPE styles and scalings
against transformers' RoPE code, architecture variants against each other, quantized weights,
errors -- and, marked slow, the real SmolLM2 Q4_1 file against transformers loading the same
GGUF. (Its parity with transformers on converted HF models is in test_convert_hf.py.)"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pyllm.errors import ModelError
from pyllm.formats.gguf import GGMLType, GGUFWriter
from pyllm.tools.convert.hf import HFConfig, model_metadata, rope_metadata
from pyllm.tools.convert.tensor_map import permute_qk
from tests.reference import LlamaRef, RefParams, dequantize_tensor, rope_inv_freq
from tests.reference.llama_ref import dequantize_rows

V, L = 200, 2


@dataclass(frozen=True)
class Shape:
    d: int = 48  # n_embd
    f: int = 80  # n_ff
    h: int = 6  # n_head
    hkv: int = 2  # n_head_kv
    hd: int = 16  # head_dim (h * hd != d on purpose: key_length is honoured)


SMALL = Shape()


def random_weights(seed: int = 0, bias: bool = False, s: Shape = SMALL) -> dict[str, np.ndarray]:
    """HF-layout (unpermuted) weights of a tiny model, as GGUF names."""
    rng = np.random.default_rng(seed)

    def m(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    def norm() -> np.ndarray:
        return rng.uniform(0.5, 1.5, s.d).astype(np.float32)

    q, kv = s.h * s.hd, s.hkv * s.hd
    w = {"token_embd.weight": m(V, s.d), "output.weight": m(V, s.d), "output_norm.weight": norm()}
    for i in range(L):
        b = f"blk.{i}."
        w[b + "attn_norm.weight"] = norm()
        w[b + "ffn_norm.weight"] = norm()
        w[b + "attn_q.weight"] = m(q, s.d)
        w[b + "attn_k.weight"] = m(kv, s.d)
        w[b + "attn_v.weight"] = m(kv, s.d)
        w[b + "attn_output.weight"] = m(s.d, q)
        w[b + "ffn_gate.weight"] = m(s.f, s.d)
        w[b + "ffn_up.weight"] = m(s.f, s.d)
        w[b + "ffn_down.weight"] = m(s.d, s.f)
        if bias:
            for n, rows in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
                w[b + n + ".bias"] = m(rows)
    return w


def write_gguf(path: Path, arch: str, weights: dict[str, np.ndarray], s: Shape = SMALL,
               quantize: GGMLType | None = None) -> Path:
    """A GGUF for ``arch``; llama-style archs get their q/k rows permuted like the converter."""
    w = GGUFWriter(path)
    md = {
        "general.architecture": arch,
        f"{arch}.context_length": 256, f"{arch}.embedding_length": s.d,
        f"{arch}.block_count": L, f"{arch}.feed_forward_length": s.f,
        f"{arch}.attention.head_count": s.h, f"{arch}.attention.head_count_kv": s.hkv,
        f"{arch}.attention.key_length": s.hd, f"{arch}.attention.value_length": s.hd,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, f"{arch}.rope.freq_base": 10000.0,
    }
    for k, v in md.items():
        w.add_kv(k, v)
    for name, a in weights.items():
        if arch != "qwen2" and (".attn_q." in name or ".attn_k." in name):
            a = permute_qk(a, s.h if ".attn_q." in name else s.hkv)
        if quantize is not None and a.ndim == 2:
            from gguf.quants import GGMLQuantizationType
            from gguf.quants import quantize as gguf_quantize

            packed = gguf_quantize(a, GGMLQuantizationType(int(quantize)))
            w.add_tensor(name, packed, quantize, dims=tuple(reversed(a.shape)))
        else:
            w.add_tensor(name, np.ascontiguousarray(a))
    w.write()
    return path


TOKENS = np.random.default_rng(5).integers(0, V, 40)


def test_neox_and_permuted_normal_rope_agree(tmp_path: Path) -> None:
    """qwen2 (NeoX RoPE on HF rows) == llama (normal RoPE on permuted rows): the permutation
    and both RoPE styles are consistent with each other."""
    weights = random_weights(bias=True)
    llama = LlamaRef(str(write_gguf(tmp_path / "l.gguf", "llama", weights))).forward(TOKENS)
    qwen = LlamaRef(str(write_gguf(tmp_path / "q.gguf", "qwen2", weights))).forward(TOKENS)
    np.testing.assert_allclose(qwen, llama, atol=1e-10)
    # and not by accident: normal RoPE on unpermuted rows computes something else
    unpermuted = LlamaRef(str(tmp_path / "q.gguf"))
    unpermuted.params.rope_neox = False
    assert np.abs(unpermuted.forward(TOKENS) - llama).max() > 1e-2


def test_internlm2_is_llama_graph(tmp_path: Path) -> None:
    weights = random_weights(1)
    a = LlamaRef(str(write_gguf(tmp_path / "l.gguf", "llama", weights))).forward(TOKENS)
    b = LlamaRef(str(write_gguf(tmp_path / "i.gguf", "internlm2", weights))).forward(TOKENS)
    np.testing.assert_array_equal(a, b)


def test_tied_embeddings_and_causality(tmp_path: Path) -> None:
    weights = random_weights(2)
    weights.pop("output.weight")
    ref = LlamaRef(str(write_gguf(tmp_path / "t.gguf", "llama", weights)))
    trace: dict[str, np.ndarray] = {}
    full = ref.forward(TOKENS, trace)
    # logits at position i depend only on tokens[: i + 1]
    np.testing.assert_allclose(ref.forward(TOKENS[:7]), full[:7], atol=1e-10)
    # tied: the head is the embedding matrix
    np.testing.assert_allclose(full, trace["result_norm"] @ weights["token_embd.weight"].T.astype(
        np.float64), atol=1e-10)
    assert trace["blk.1.q_rope"].shape == (len(TOKENS), SMALL.h, SMALL.hd)
    assert trace["blk.0.k_rope"].shape == (len(TOKENS), SMALL.hkv, SMALL.hd)


@pytest.mark.parametrize("qtype", [GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q4_1])
def test_quantized_weights(tmp_path: Path, qtype: GGMLType) -> None:
    """A quantized file computes exactly what an F32 file of its dequantized weights does."""
    shape = Shape(d=64, f=96, h=4, hkv=2, hd=16)  # rows in whole blocks of 32
    weights = random_weights(3, s=shape)
    ref = LlamaRef(str(write_gguf(tmp_path / "q.gguf", "llama", weights, shape, qtype)))
    quant = ref.forward(TOKENS)
    r = ref.reader
    w = GGUFWriter(tmp_path / "deq.gguf")
    w.add_metadata(r.metadata, r.value_types)
    for t in r.tensors:
        w.add_tensor(t.name, dequantize_tensor(t, np.float32))
    w.write()
    np.testing.assert_allclose(quant, LlamaRef(str(tmp_path / "deq.gguf")).forward(TOKENS),
                               rtol=0, atol=1e-9)
    emb = r.tensor("token_embd.weight")
    assert emb.type == qtype
    np.testing.assert_array_equal(dequantize_rows(emb, TOKENS, np.float64),
                                  dequantize_tensor(emb)[TOKENS])
    # the dequantized values are the originals plus quantization noise
    got = dequantize_tensor(r.tensor("blk.0.ffn_up.weight"))
    noise = np.abs(got - weights["blk.0.ffn_up.weight"]).max()
    assert 0 < noise < {GGMLType.Q8_0: 0.01, GGMLType.Q5_0: 0.1, GGMLType.Q4_1: 0.2}[qtype]


def test_errors(tmp_path: Path) -> None:
    weights = random_weights(4)
    path = write_gguf(tmp_path / "g.gguf", "gpt2", weights)
    with pytest.raises(ModelError, match="gpt2"):
        LlamaRef(str(path))
    ref = LlamaRef(str(write_gguf(tmp_path / "l.gguf", "llama", weights)))
    for bad in ([], [V], [-1]):
        with pytest.raises(ModelError):
            ref.forward(bad)


# ---- RoPE frequencies against transformers' own RoPE code ----------------------------------

ROPES = [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.5},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 32,
     "beta_fast": 8.0, "beta_slow": 2.0},
    {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0, "original_max_position_embeddings": 64,
     "mscale": 1.0, "mscale_all_dim": 0.707},
    {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0, "original_max_position_embeddings": 64,
     "attention_factor": 1.25},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
]


@pytest.mark.parametrize("rope", ROPES, ids=lambda r: r["rope_type"] + str(len(r)))
@pytest.mark.parametrize("seq_len", [100, 300])
def test_rope_frequencies_match_transformers(rope: dict[str, Any], seq_len: int) -> None:
    import torch  # noqa: F401
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = dict(hidden_size=256, num_attention_heads=4, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads_kv=4, max_position_embeddings=256,
                  vocab_size=10, rope_parameters=dict(rope))
    cfg = transformers.LlamaConfig(**hf_cfg)
    if rope["rope_type"] == "default":
        hf_inv, hf_scale = 1.0 / rope["rope_theta"] ** (np.arange(0, 64, 2) / 64), 1.0
    else:
        inv, hf_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, None, seq_len=seq_len)
        hf_inv = inv.double().numpy()

    ours_cfg = HFConfig.from_dict({**hf_cfg, "architectures": ["LlamaForCausalLM"]})
    md, freqs = rope_metadata(ours_cfg)
    md.update(model_metadata(ours_cfg, 10, "t", "f32"))
    p = RefParams.from_metadata(md, 10)
    inv_freq, mscale = rope_inv_freq(p, seq_len, freqs)
    np.testing.assert_allclose(inv_freq, hf_inv, rtol=2e-6)
    assert mscale == pytest.approx(hf_scale, rel=1e-6)


# ---- the real model ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.model
def test_smollm2_matches_transformers_gguf(smollm2_path: Path) -> None:
    """Reference on SmolLM2-135M Q4_1 == transformers loading the same GGUF (it dequantizes
    with the gguf package and un-permutes q/k itself), offline."""
    import accelerate  # noqa: F401
    import torch
    import transformers
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # "<|im_start|>The capital of France is Paris. It is a city of light and art." as SmolLM2
    # token ids (from its tokenizer), so no tokenizer is needed here
    toks = np.array([1, 504, 3575, 282, 4649, 314, 7042, 30, 657, 314, 253, 2240, 282, 1420,
                     284, 984, 30])
    ref = LlamaRef(str(smollm2_path), dtype=np.float32)
    assert (ref.params.n_layer, ref.params.n_head, ref.params.n_head_kv) == (30, 9, 3)
    ours = ref.forward(toks)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(Path(smollm2_path).parent), gguf_file=Path(smollm2_path).name,
        dtype=torch.float32)
    with torch.no_grad():
        want = model(torch.tensor(toks[None])).logits[0].double().numpy()
    assert ours.shape == want.shape == (len(toks), 49152)
    diff = np.abs(ours - want).max()
    print(f"SmolLM2 Q4_1 reference vs transformers: max |diff| {diff:.2e}, "
          f"max |logit| {np.abs(want).max():.1f}")
    assert diff < 2e-3 * np.abs(want).max()
    assert (ours.argmax(-1) == want.argmax(-1)).all()
