"""Hugging Face folder -> GGUF: tiny random transformers models, converted, must give the same
logits in the numpy reference forward as in transformers itself; plus checkpoint formats
(sharded safetensors, bf16, .bin), metadata, and refusal of bad or hostile input."""

from __future__ import annotations

import copy
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from pyllm.errors import ConvertError
from pyllm.formats.gguf import GGMLType, GGUFReader
from pyllm.tools.convert import convert_hf
from pyllm.tools.convert.hf import f32_to_bf16, llama3_rope_factors
from pyllm.tools.convert.tensor_map import permute_qk
from tests.reference import LlamaRef

N_TOKENS = 64
VOCAB = 320
BASE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, rms_norm_eps=1e-5,
)

# name -> (transformers model class, config overrides)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama_gqa": ("Llama", {}),
    "llama_tied_mqa": ("Llama", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "llama_mha_3layers": ("Llama", {"num_key_value_heads": 4, "num_hidden_layers": 3}),
    "llama_bias_theta": ("Llama", {"attention_bias": True, "mlp_bias": True,
                                   "rope_theta": 500000.0}),
    "llama_linear": ("Llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama_dynamic": ("Llama", {"max_position_embeddings": 32,
                                "rope_scaling": {"rope_type": "dynamic", "factor": 3.0}}),
    "llama_yarn": ("Llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 32}}),
    "llama_yarn_mscale": ("Llama", {"rope_scaling": {
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
        "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 0.8, "mscale_all_dim": 0.5}}),
    "llama_llama3": ("Llama", {"rope_theta": 50000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "qwen2": ("Qwen2", {}),
    "qwen2_tied": ("Qwen2", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "qwen2_yarn": ("Qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 32}}),
    "mistral_head_dim": ("Mistral", {"head_dim": 32, "sliding_window": None}),
}
SCALED = [k for k, (_, o) in CASES.items() if "rope_scaling" in o]


def make_model(kind: str, overrides: dict[str, Any], seed: int = 0) -> Any:
    """A random tiny model whose weights are large enough for every part to matter."""
    cfg_cls = getattr(transformers, f"{kind}Config")
    model_cls = getattr(transformers, f"{kind}ForCausalLM")
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**BASE, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.25 if p.dim() > 1 else 0.1)
    return model


def tokens() -> np.ndarray:
    return np.random.default_rng(1).integers(0, VOCAB, N_TOKENS)


def hf_logits(model: Any, toks: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(toks[None])).logits[0].double().numpy()


def round_matrices(model: Any, outtype: str) -> None:
    """Round 2-D weights the way the GGUF stores them (1-D ones stay F32), so that transformers
    computes with exactly the weights the reference reads."""
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}.get(outtype)
    if dtype is None:
        return
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(p.to(dtype).float())


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Path]]:
    out = {}
    for name, (kind, overrides) in CASES.items():
        model = make_model(kind, overrides)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (model, path)
    return out


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(saved: dict[str, tuple[Any, Path]], case: str, outtype: str,
                                   tmp_path: Path) -> None:
    model, src = saved[case]
    out = convert_hf(src, tmp_path / "m.gguf", outtype, progress=False)
    toks = tokens()
    ref = LlamaRef(str(out)).forward(toks)
    model = make_model(*CASES[case])  # a fresh copy: rounding must not leak into other tests
    round_matrices(model, outtype)
    want = hf_logits(model, toks)
    assert ref.shape == (N_TOKENS, VOCAB)
    assert np.abs(want).max() > 1.0  # logits are not degenerate
    assert np.abs(ref - want).max() < 1e-4


@pytest.mark.parametrize("case", SCALED)
def test_rope_scaling_matters(saved: dict[str, tuple[Any, Path]], case: str,
                              tmp_path: Path) -> None:
    """The parity above would catch a converter or reference that ignored the scaling."""
    model, src = saved[case]
    theta = CASES[case][1].get("rope_theta", 10000.0)
    out = convert_hf(src, tmp_path / "m.gguf", "f32", progress=False,
                     extra_config={"rope_parameters": {"rope_type": "default",
                                                       "rope_theta": theta}})
    toks = tokens()
    assert np.abs(LlamaRef(str(out)).forward(toks) - hf_logits(model, toks)).max() > 1e-2


def test_metadata_and_types(saved: dict[str, tuple[Any, Path]], tmp_path: Path) -> None:
    _, src = saved["llama_yarn"]
    r = GGUFReader(convert_hf(src, tmp_path / "m.gguf", "f16", progress=False))
    md = r.metadata
    assert md["general.architecture"] == "llama"
    assert md["general.file_type"] == 1
    expect = {
        "llama.context_length": 128, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": 96, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
        "llama.rope.scaling.type": "yarn", "llama.rope.scaling.original_context_length": 32,
        "llama.vocab_size": VOCAB,
    }
    for key, value in expect.items():
        assert md[key] == value, key
    assert md["llama.rope.scaling.factor"] == pytest.approx(4.0)
    assert md["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert md["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    types = {t.name: t.type for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == GGMLType.F16
    assert types["blk.0.attn_norm.weight"] == GGMLType.F32  # 1-D tensors stay F32
    assert "output.weight" in types
    n = 2 + 2 * 9 + 1  # embeddings, output, final norm + 9 per block
    assert len(r.tensors) == n
    tied = GGUFReader(convert_hf(saved["llama_tied_mqa"][1], tmp_path / "t.gguf", "bf16",
                                 progress=False))
    assert "output.weight" not in {t.name for t in tied.tensors}
    assert tied.metadata["general.file_type"] == 32
    assert tied.tensor("token_embd.weight").type == GGMLType.BF16


def test_qk_permutation_is_exact(saved: dict[str, tuple[Any, Path]], tmp_path: Path) -> None:
    model, src = saved["llama_gqa"]
    r = GGUFReader(convert_hf(src, tmp_path / "m.gguf", "f32", progress=False))
    attn = model.model.layers[1].self_attn
    q = attn.q_proj.weight.detach().numpy()
    k = attn.k_proj.weight.detach().numpy()
    np.testing.assert_array_equal(r.tensor("blk.1.attn_q.weight").data, permute_qk(q, 4))
    np.testing.assert_array_equal(r.tensor("blk.1.attn_k.weight").data, permute_qk(k, 2))
    # row 2i of a head takes HF row i, row 2i + 1 takes HF row i + head_dim / 2
    np.testing.assert_array_equal(permute_qk(q, 4)[16 + 2 * 3 + 1], q[16 + 8 + 3])
    # qwen2 keeps HF's row order (it runs NeoX-style RoPE)
    _, qsrc = saved["qwen2"]
    rq = GGUFReader(convert_hf(qsrc, tmp_path / "q.gguf", "f32", progress=False))
    qq = saved["qwen2"][0].model.layers[0].self_attn.q_proj
    np.testing.assert_array_equal(rq.tensor("blk.0.attn_q.weight").data, qq.weight.detach())
    np.testing.assert_array_equal(rq.tensor("blk.0.attn_q.bias").data, qq.bias.detach())


def test_sharded_bf16_safetensors(tmp_path: Path) -> None:
    model = make_model("Llama", {})
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    # save a bf16 copy; the float model keeps its float32 RoPE buffer for the comparison
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / "src",
                                                            max_shard_size="40KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 2
    out = convert_hf(tmp_path / "src", tmp_path / "m.gguf", "bf16", progress=False)
    r = GGUFReader(out)
    emb = model.model.embed_tokens.weight.detach().to(torch.bfloat16)
    emb = emb.view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(r.tensor("token_embd.weight").data, emb)  # bit-exact
    toks = tokens()
    want = hf_logits(model, toks)
    assert np.abs(LlamaRef(str(out)).forward(toks) - want).max() < 1e-4


def _to_bin(src: Path, dst: Path, n_shards: int) -> None:
    """Re-save a safetensors folder as pytorch_model*.bin (what older transformers wrote)."""
    from safetensors.torch import load_file

    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(str(src / "model.safetensors"))
    names = sorted(sd)
    if n_shards == 1:
        torch.save(sd, dst / "pytorch_model.bin")
        return
    weight_map = {}
    for i in range(n_shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {n: sd[n] for n in names[i::n_shards]}
        torch.save(part, dst / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("n_shards", [1, 3])
def test_pytorch_bin(saved: dict[str, tuple[Any, Path]], tmp_path: Path, n_shards: int) -> None:
    model, src = saved["qwen2"]
    _to_bin(src, tmp_path / "bin", n_shards)
    out = convert_hf(tmp_path / "bin", tmp_path / "m.gguf", "f32", progress=False)
    toks = tokens()
    assert np.abs(LlamaRef(str(out)).forward(toks) - hf_logits(model, toks)).max() < 1e-4


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", ["torch_zip", "pickle_p2", "pickle_p5"])
def test_malicious_pickle_is_refused(saved: dict[str, tuple[Any, Path]], tmp_path: Path,
                                     container: str) -> None:
    marker = tmp_path / "pwned"
    src = tmp_path / "evil"
    src.mkdir()
    (src / "config.json").write_text((saved["llama_gqa"][1] / "config.json").read_text())
    payload = {"model.embed_tokens.weight": _Evil(marker)}
    if container == "torch_zip":
        torch.save(payload, src / "pytorch_model.bin")
    else:
        (src / "pytorch_model.bin").write_bytes(pickle.dumps(payload, int(container[-1])))
    with pytest.raises(ConvertError, match="refused"):
        convert_hf(src, tmp_path / "m.gguf", "f32", progress=False)
    assert not marker.exists()
    assert not (tmp_path / "m.gguf").exists()


def test_bin_without_torch(saved: dict[str, tuple[Any, Path]], tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    _to_bin(saved["qwen2"][1], tmp_path / "bin", 1)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(ConvertError, match="needs torch"):
        convert_hf(tmp_path / "bin", tmp_path / "m.gguf", "f32", progress=False)


def _internlm2_folder(model: Any, dst: Path) -> None:
    """Rewrite a Llama model as an InternLM2 checkpoint (fused, per-group wqkv)."""
    from safetensors.numpy import save_file

    cfg = model.config
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = H // Hkv
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = {
        "model.tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "model.norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        p, o = f"model.layers.{i}.", f"model.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"].reshape(Hkv, g, hd, -1)
        k = sd[p + "self_attn.k_proj.weight"].reshape(Hkv, 1, hd, -1)
        v = sd[p + "self_attn.v_proj.weight"].reshape(Hkv, 1, hd, -1)
        out[o + "attention.wqkv.weight"] = np.concatenate([q, k, v], 1).reshape(-1, q.shape[-1])
        out[o + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        if cfg.attention_bias:
            qb = sd[p + "self_attn.q_proj.bias"].reshape(Hkv, g, hd)
            kb = sd[p + "self_attn.k_proj.bias"].reshape(Hkv, 1, hd)
            vb = sd[p + "self_attn.v_proj.bias"].reshape(Hkv, 1, hd)
            out[o + "attention.wqkv.bias"] = np.concatenate([qb, kb, vb], 1).reshape(-1)
            out[o + "attention.wo.bias"] = sd[p + "self_attn.o_proj.bias"]
        out[o + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[o + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[o + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[o + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[o + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        for hf, ilm in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            if p + f"mlp.{hf}.bias" in sd:
                out[o + f"feed_forward.{ilm}.bias"] = sd[p + f"mlp.{hf}.bias"]
    dst.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, str(dst / "model.safetensors"))
    config = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size",
                                            "num_hidden_layers", "num_attention_heads",
                                            "num_key_value_heads", "max_position_embeddings",
                                            "rms_norm_eps", "vocab_size")}
    config.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2",
                  rope_theta=cfg.rope_parameters["rope_theta"], bias=cfg.attention_bias,
                  tie_word_embeddings=False)
    (dst / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case", ["llama_gqa", "llama_mha_3layers", "llama_bias_theta"])
def test_internlm2_fused_qkv(saved: dict[str, tuple[Any, Path]], tmp_path: Path,
                             case: str) -> None:
    model, _ = saved[case]
    _internlm2_folder(model, tmp_path / "ilm")
    out = convert_hf(tmp_path / "ilm", tmp_path / "m.gguf", "f32", progress=False)
    assert GGUFReader(out).metadata["general.architecture"] == "internlm2"
    toks = tokens()
    assert np.abs(LlamaRef(str(out)).forward(toks) - hf_logits(model, toks)).max() < 1e-4


def test_chat_template_copied(saved: dict[str, tuple[Any, Path]], tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for f in saved["qwen2"][1].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    r = GGUFReader(convert_hf(src, tmp_path / "m.gguf", "f16", progress=False))
    assert r.metadata["tokenizer.chat_template"] == template


def _copy_with_config(src: Path, dst: Path, **changes: Any) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(("changes", "match"), [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported model"),
    ({"hidden_size": None}, "hidden_size"),
    ({"num_attention_heads": 3}, "multiple|heads"),
    ({"intermediate_size": 100}, "shape"),
    ({"num_hidden_layers": 3}, "block 2 lacks"),
    ({"num_hidden_layers": 1}, "block 1 but"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "not supported"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "factor"),
    ({"tie_word_embeddings": False}, None),  # the llama_tied source has no lm_head
])
def test_bad_config_is_refused(saved: dict[str, tuple[Any, Path]], tmp_path: Path,
                               changes: dict[str, Any], match: str | None) -> None:
    name = "llama_tied_mqa" if "tie_word_embeddings" in changes else "llama_gqa"
    src = _copy_with_config(saved[name][1], tmp_path / "src", **changes)
    with pytest.raises(ConvertError, match=match or "lm_head"):
        convert_hf(src, tmp_path / "m.gguf", "f16", progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_bad_folders_are_refused(saved: dict[str, tuple[Any, Path]], tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="not a directory"):
        convert_hf(tmp_path / "missing", tmp_path / "m.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="config.json"):
        convert_hf(tmp_path / "empty", tmp_path / "m.gguf")
    src = _copy_with_config(saved["llama_gqa"][1], tmp_path / "src")
    with pytest.raises(ConvertError, match="outtype"):
        convert_hf(src, tmp_path / "m.gguf", "q3_k")
    (src / "model.safetensors").write_bytes(b"\xff" * 64)  # garbage weights
    with pytest.raises(ConvertError, match="safetensors"):
        convert_hf(src, tmp_path / "m.gguf", "f16", progress=False)
    (src / "model.safetensors").unlink()
    with pytest.raises(ConvertError, match="no .*weights"):
        convert_hf(src, tmp_path / "m.gguf", "f16", progress=False)
    # an index may not point outside the folder
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "../secret.safetensors"}}))
    with pytest.raises(ConvertError, match="bad shard file name"):
        convert_hf(src, tmp_path / "m.gguf", "f16", progress=False)


def test_bf16_rounding_matches_torch() -> None:
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 1e3,
                        np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, 1e-40], np.float32)])
    want = torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(f32_to_bf16(a), want)
    nan = f32_to_bf16(np.array([np.nan], np.float32))
    assert (nan[0] & 0x7F80) == 0x7F80 and (nan[0] & 0x7F) != 0


def test_llama3_factors_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_parameters=rope)
    hf, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, None)
    base = 500000.0 ** (-np.arange(0, 64, 2) / 64)
    ours = base / llama3_rope_factors(500000.0, 64, 8.0, 1.0, 4.0, 8192)
    np.testing.assert_allclose(ours, hf.double().numpy(), rtol=1e-6)


def test_tokenizer_is_converted_and_padded(saved: dict[str, tuple[Any, Path]],
                                           tmp_path: Path) -> None:
    from pyllm.tokenizer import Tokenizer, TokenType
    from pyllm.tokenizer.bpe import bytes_to_token_text

    src = _copy_with_config(saved["llama_gqa"][1], tmp_path / "src")
    vocab = {bytes_to_token_text(bytes([b])): b for b in range(256)}
    vocab.update({"Ġt": 256, "he": 257, "Ġthe": 258})
    data = {
        "model": {"type": "BPE", "vocab": vocab, "merges": ["Ġ t", "h e", "Ġt he"]},
        "added_tokens": [{"id": 259, "content": "<|endoftext|>", "special": True}],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "decoder": {"type": "ByteLevel"},
    }
    (src / "tokenizer.json").write_text(json.dumps(data))
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "chat_template": "{{ messages[0].content }}"}))
    out = convert_hf(src, tmp_path / "m.gguf", "f16", progress=False)
    md = GGUFReader(out).metadata
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "gpt-2"
    assert len(md["tokenizer.ggml.tokens"]) == VOCAB  # 260 tokens padded to 320 rows
    assert md["tokenizer.ggml.tokens"][VOCAB - 1] == f"[PAD{VOCAB - 1}]"
    assert md["tokenizer.ggml.token_type"][300] == TokenType.UNUSED
    assert md["tokenizer.ggml.eos_token_id"] == 259
    assert md["tokenizer.chat_template"] == "{{ messages[0].content }}"
    tok = Tokenizer.from_gguf(out)
    ids = tok.encode("a the", add_special=False)
    assert ids == [ord("a"), 258] and tok.decode(ids) == "a the"
    # more tokens than embedding rows cannot be right
    vocab.update({f"x{i}": 260 + i for i in range(VOCAB)})
    (src / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConvertError, match="embedding rows"):
        convert_hf(src, tmp_path / "m2.gguf", "f16", progress=False)


def test_q8_0_output(saved: dict[str, tuple[Any, Path]], tmp_path: Path) -> None:
    from gguf.quants import GGMLQuantizationType, dequantize, quantize

    _, src = saved["llama_gqa"]
    out = convert_hf(src, tmp_path / "m.gguf", "q8_0", progress=False)
    r = GGUFReader(out)
    assert r.metadata["general.file_type"] == 7
    assert r.tensor("blk.0.ffn_down.weight").type == GGMLType.Q8_0
    assert r.tensor("blk.0.ffn_norm.weight").type == GGMLType.F32
    model = make_model(*CASES["llama_gqa"])
    q8 = GGMLQuantizationType.Q8_0
    # bytes as the gguf package (llama.cpp's algorithm) quantizes the same rows
    up = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    np.testing.assert_array_equal(r.tensor("blk.0.ffn_up.weight").data, quantize(up, q8))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.from_numpy(dequantize(quantize(p.numpy(), q8), q8)))
    toks = tokens()
    assert np.abs(LlamaRef(str(out)).forward(toks) - hf_logits(model, toks)).max() < 1e-4


@pytest.mark.parametrize("case", ["llama_gqa", "llama_tied_mqa", "qwen2"])
def test_transformers_reads_our_gguf(saved: dict[str, tuple[Any, Path]], tmp_path: Path,
                                     case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' own GGUF loader (llama.cpp conventions: names, metadata keys, q/k
    permutation) reads the converted file back to the original model."""
    import gguf  # noqa: F401
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, src = saved[case]
    (tmp_path / "g").mkdir()
    convert_hf(src, tmp_path / "g" / "m.gguf", "f32", progress=False)
    back = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "g"), gguf_file="m.gguf", dtype=torch.float32)
    toks = tokens()
    np.testing.assert_allclose(hf_logits(back, toks), hf_logits(model, toks), rtol=0, atol=1e-5)


def test_sliding_window_is_reported(saved: dict[str, tuple[Any, Path]], tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    src = _copy_with_config(saved["mistral_head_dim"][1], tmp_path / "src", sliding_window=32)
    with caplog.at_level("WARNING", logger="pyllm.tools.convert"):
        convert_hf(src, tmp_path / "m.gguf", "f16", progress=False)
    assert "32-token sliding window" in caplog.text


@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_conversion_streams(tmp_path: Path, outtype: str) -> None:
    """Tensors are read, converted and written one at a time: the peak of Python/numpy
    allocations stays a small fraction of the model."""
    import tracemalloc

    model = make_model("Llama", {"hidden_size": 256, "intermediate_size": 512,
                                 "num_hidden_layers": 6, "vocab_size": 1024})
    model.save_pretrained(tmp_path / "src", max_shard_size="4MB")
    total = sum(p.numel() * 4 for p in model.parameters())
    del model
    tracemalloc.start()
    try:
        convert_hf(tmp_path / "src", tmp_path / "m.gguf", outtype, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < total / 3, (peak, total)


def test_legacy_config_spelling() -> None:
    """transformers 4.x wrote rope_theta at the top and rope_scaling with "type"."""
    from pyllm.tools.convert.hf import HFConfig, rope_metadata

    cfg = HFConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 4096,
        "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0},
    })
    md, freqs = rope_metadata(cfg)
    assert freqs is None and cfg.n_head_kv == 4 and cfg.head_dim == 16
    assert md == {"llama.rope.freq_base": 1e6, "llama.rope.dimension_count": 16,
                  "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}
    yarn = HFConfig.from_dict({**cfg.raw, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}})
    md, _ = rope_metadata(yarn)
    assert md["llama.rope.scaling.original_context_length"] == 1024
    assert md["llama.rope.scaling.yarn_attn_factor"] == pytest.approx(1.0)
