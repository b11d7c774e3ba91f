"""Meta / LLaMA2-Accessory checkpoints -> GGUF, and fastllm-style config overrides.

A random tiny Llama (GQA) is written as Meta does (``params.json`` + ``consolidated.NN.pth``),
unsplit and split into model-parallel shards; every layout must give the same GGUF tensors, and
the GGUF must give the logits of Meta's own forward pass (interleaved complex RoPE), written
here in torch, both in the C++ runtime and in the numpy reference."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pyllm.errors import ConvertError
from pyllm.formats.gguf import GGMLType, GGUFReader
from pyllm.tools.convert import convert, convert_meta
from pyllm.tools.convert.meta import feed_forward_length
from tests.reference import LlamaRef

PARAMS: dict[str, Any] = dict(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=1.3,
    norm_eps=1e-5, rope_theta=10000.0, vocab_size=-1,
)
N_FF = 224  # int(2 * 4 * 64 / 3) = 170, * 1.3 -> 221, rounded up to a multiple of 32
VOCAB = 320  # embedding rows; the 300-piece tokenizer is padded up to them
TOKENS = np.random.default_rng(1).integers(0, VOCAB, 48)

COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1",
                   "feed_forward.w3")


def meta_weights(seed: int = 0, bias: bool = False, params: dict[str, Any] = PARAMS,
                 n_vocab: int = VOCAB) -> dict[str, Any]:
    """Random weights under Meta's names, large enough for every part to matter."""
    g = torch.Generator().manual_seed(seed)
    D, hd = params["dim"], params["dim"] // params["n_heads"]
    q, kv = params["n_heads"] * hd, params["n_kv_heads"] * hd
    n_ff = feed_forward_length(D, params["multiple_of"], params["ffn_dim_multiplier"])

    def rnd(*shape: int, scale: float = 0.25) -> Any:
        return torch.randn(*shape, generator=g) * scale

    sd = {"tok_embeddings.weight": rnd(n_vocab, D, scale=1.0),
          "norm.weight": torch.rand(D, generator=g) + 0.5,
          "output.weight": rnd(n_vocab, D)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        for name, shape in (("attention.wq", (q, D)), ("attention.wk", (kv, D)),
                            ("attention.wv", (kv, D)), ("attention.wo", (D, q)),
                            ("feed_forward.w1", (n_ff, D)), ("feed_forward.w3", (n_ff, D)),
                            ("feed_forward.w2", (D, n_ff))):
            sd[p + name + ".weight"] = rnd(*shape)
            if bias:
                sd[p + name + ".bias"] = rnd(shape[0], scale=0.1)
        sd[p + "attention_norm.weight"] = torch.rand(D, generator=g) + 0.5
        sd[p + "ffn_norm.weight"] = torch.rand(D, generator=g) + 0.5
    return sd


def split_model_parallel(sd: dict[str, Any], n: int, vocab_parallel: bool) -> list[dict[str, Any]]:
    """What ``n`` fairscale model-parallel ranks save: column-parallel layers keep a slice of
    output rows (biases too), row-parallel layers a slice of input columns (bias whole),
    the embedding a slice of its width (Llama 2) or of the vocabulary (Llama 3)."""
    shards: list[dict[str, Any]] = [{} for _ in range(n)]
    for name, t in sd.items():
        leaf = name.split(".", 2)[-1] if name.startswith("layers.") else name
        if leaf.startswith(COLUMN_PARALLEL) or name == "output.weight":
            parts = t.chunk(n, 0)
        elif leaf in ("attention.wo.weight", "feed_forward.w2.weight"):
            parts = t.chunk(n, 1)
        elif name == "tok_embeddings.weight":
            parts = t.chunk(n, 0 if vocab_parallel else 1)
        else:  # norms, row-parallel biases
            parts = (t,) * n
        for shard, part in zip(shards, parts, strict=True):
            shard[name] = part.clone()  # a view would save the whole storage
    return shards


def write_meta(folder: Path, shards: list[dict[str, Any]], params: dict[str, Any] | None = None,
               accessory: bool = False, tokenizer: bytes | None = None) -> Path:
    """A Meta folder (or LLaMA2-Accessory's spelling: ``llma.`` names, ``NN-of-MM.model``)."""
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params or PARAMS))
    for rank, shard in enumerate(shards):
        if accessory:  # its save_checkpoint writes {"model": state dict}
            shard = {"model": {"llma." + k: v for k, v in shard.items()}}
            fname = f"consolidated.{rank:02d}-of-{len(shards):02d}.model.pth"
        else:
            # Llama 1/2 checkpoints also carry the RoPE frequency buffer: ignored
            shard = {**shard, "rope.freqs": torch.zeros(PARAMS["dim"] // PARAMS["n_heads"] // 2)}
            fname = f"consolidated.{rank:02d}.pth"
        torch.save(shard, folder / fname)
    if tokenizer is not None:
        (folder / "tokenizer.model").write_bytes(tokenizer)
    return folder


def llama31_scaling(freqs: Any, factor: float = 8.0, low: float = 1.0, high: float = 4.0,
                    old_ctx: int = 8192) -> Any:
    """Meta's Llama 3.1 ``apply_scaling``: long wavelengths slowed by ``factor``, short ones
    kept, a smooth blend between."""
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(f)
        elif wavelen > old_ctx / low:
            out.append(f / factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def meta_forward(sd: dict[str, Any], toks: np.ndarray, theta: float = PARAMS["rope_theta"],
                 linear: float = 1.0, half_split_rope: bool = False,
                 scaled_rope: bool = False) -> np.ndarray:
    """Meta's llama forward (float64): RMSNorm, RoPE on complex pairs (x[2i], x[2i+1]),
    repeat_kv for GQA, SwiGLU. ``half_split_rope`` rotates (x[i], x[i + hd/2]) instead, to
    show the layout matters."""
    w = {k: v.double() for k, v in sd.items()}
    D, H, Hkv, L = PARAMS["dim"], PARAMS["n_heads"], PARAMS["n_kv_heads"], PARAMS["n_layers"]
    hd, T, eps = D // H, len(toks), PARAMS["norm_eps"]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,)
    if scaled_rope:
        freqs = llama31_scaling(freqs)
    ang = torch.outer(torch.arange(T, dtype=torch.float64) / linear, freqs)  # (T, hd/2)
    cis = torch.polar(torch.ones_like(ang), ang)[:, None, :]  # (T, 1, hd/2)

    def rope(x: Any) -> Any:  # (T, heads, hd)
        if half_split_rope:
            z = torch.complex(x[..., : hd // 2], x[..., hd // 2:]) * cis
            return torch.cat([z.real, z.imag], -1)
        z = torch.view_as_complex(x.reshape(T, x.shape[1], hd // 2, 2).contiguous()) * cis
        return torch.view_as_real(z).reshape(x.shape)

    def norm(x: Any, name: str) -> Any:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w[name]

    def lin(x: Any, name: str) -> Any:
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    h = w["tok_embeddings.weight"][torch.as_tensor(toks)]  # (T, D)
    mask = torch.full((T, T), -math.inf, dtype=torch.float64).triu(1)
    for i in range(L):
        p = f"layers.{i}."
        x = norm(h, p + "attention_norm.weight")
        q = rope(lin(x, p + "attention.wq").view(T, H, hd))
        k = rope(lin(x, p + "attention.wk").view(T, Hkv, hd)).repeat_interleave(H // Hkv, 1)
        v = lin(x, p + "attention.wv").view(T, Hkv, hd).repeat_interleave(H // Hkv, 1)
        att = (torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask).softmax(-1)
        h = h + lin(torch.einsum("hts,shd->thd", att, v).reshape(T, D), p + "attention.wo")
        x = norm(h, p + "ffn_norm.weight")
        silu = torch.nn.functional.silu
        h = h + lin(silu(lin(x, p + "feed_forward.w1")) * lin(x, p + "feed_forward.w3"),
                    p + "feed_forward.w2")
    return lin(norm(h, "norm.weight"), "output").numpy()


@pytest.fixture(scope="module")
def spm_model() -> bytes:
    import sentencepiece as spm
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Human", "Bot"]
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(rng.choice(words, 8)) for _ in range(300)),
        model_writer=buf, vocab_size=300, model_type="bpe", byte_fallback=True,
        user_defined_symbols=["<|turn|>"], minloglevel=2,
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, spm_model: bytes) -> tuple[Any, Path]:
    """The unsplit model, converted to F32 (shared by the tests that only read it)."""
    root = tmp_path_factory.mktemp("meta")
    sd = meta_weights()
    src = write_meta(root / "mp1", [sd], tokenizer=spm_model)
    return sd, convert_meta(src, root / "mp1.gguf", "f32", progress=False)


def _tensors(path: Path) -> dict[str, tuple[GGMLType, np.ndarray]]:
    return {t.name: (t.type, np.array(t.data)) for t in GGUFReader(path).tensors}


def test_feed_forward_length_matches_meta_models() -> None:
    assert feed_forward_length(4096, 256, None) == 11008  # Llama 2 7B
    assert feed_forward_length(5120, 256, None) == 13824  # Llama 2 13B
    assert feed_forward_length(8192, 4096, 1.3) == 28672  # Llama 2 70B
    assert feed_forward_length(4096, 1024, 1.3) == 14336  # Llama 3 8B
    assert feed_forward_length(PARAMS["dim"], 32, 1.3) == N_FF


@pytest.mark.parametrize("n, vocab_parallel", [(2, False), (2, True), (4, False)])
def test_model_parallel_shards_merge_to_the_same_file(base: tuple[Any, Path], tmp_path: Path,
                                                      spm_model: bytes, n: int,
                                                      vocab_parallel: bool) -> None:
    sd, ref_path = base
    src = write_meta(tmp_path / "mp", split_model_parallel(sd, n, vocab_parallel),
                     tokenizer=spm_model)
    out = convert_meta(src, tmp_path / "mp.gguf", "f32", name="mp1", progress=False)
    got, want = _tensors(out), _tensors(ref_path)
    assert list(got) == list(want)  # same tensors, same order
    for name, (ttype, data) in want.items():
        assert got[name][0] == ttype and np.array_equal(got[name][1], data), name
    md_got, md_want = GGUFReader(out).metadata, GGUFReader(ref_path).metadata
    md_want["general.name"] = "mp1"
    assert md_got.keys() == md_want.keys()
    for key, value in md_want.items():
        assert np.array_equal(md_got[key], value) if isinstance(value, np.ndarray) \
            else md_got[key] == value, key


def test_metadata_and_tokenizer(base: tuple[Any, Path]) -> None:
    md = GGUFReader(base[1]).metadata
    assert md["general.architecture"] == "llama"
    assert md["llama.feed_forward_length"] == N_FF
    assert md["llama.attention.head_count_kv"] == 2
    assert md["llama.context_length"] == 4096  # Llama 2 (norm_eps 1e-5) default
    assert md["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert md["tokenizer.ggml.model"] == "llama"
    assert len(md["tokenizer.ggml.tokens"]) == VOCAB  # 300 pieces padded to the rows
    assert md["tokenizer.ggml.tokens"][VOCAB - 1] == f"[PAD{VOCAB - 1}]"
    names = [t.name for t in GGUFReader(base[1]).tensors]
    assert "rope.freqs" not in " ".join(names) and names[0] == "token_embd.weight"


def test_logits_match_meta_forward(base: tuple[Any, Path]) -> None:
    from pyllm.runtime.llm import LLM

    sd, path = base
    want = meta_forward(sd, TOKENS)
    ref = LlamaRef(str(path)).forward(TOKENS)
    assert np.abs(ref - want).max() < 1e-4
    with LLM(path, kv_type="f32", n_ctx=64) as llm:
        got = llm.logits(TOKENS)
    assert np.abs(got - want).max() < 1e-3
    # Meta's q/k are already in llama.cpp's adjacent-pair layout: were the converter to
    # permute them (as HF checkpoints need), this half-split RoPE is what it would compute
    assert np.abs(meta_forward(sd, TOKENS, half_split_rope=True) - want).max() > 0.1


def test_accessory_layout_bf16_biases(tmp_path: Path, spm_model: bytes) -> None:
    """LLaMA2-Accessory: ``llma.`` prefix, ``NN-of-MM.model.pth`` names, bias-tuned layers,
    bf16 storage, and ``max_seq_len`` in params."""
    sd = {k: v.to(torch.bfloat16) for k, v in meta_weights(seed=3, bias=True).items()}
    params = {**PARAMS, "max_seq_len": 512}
    src = write_meta(tmp_path / "acc", split_model_parallel(sd, 2, False), params,
                     accessory=True)
    (tmp_path / "tokenizer.model").write_bytes(spm_model)  # one level up, as Meta ships it
    out = convert_meta(src, tmp_path / "acc.gguf", "f32", progress=False)
    assert GGUFReader(out).metadata["llama.context_length"] == 512
    assert len(GGUFReader(out).metadata["tokenizer.ggml.tokens"]) == VOCAB
    assert "blk.1.attn_q.bias" in {t.name for t in GGUFReader(out).tensors}
    got = LlamaRef(str(out)).forward(TOKENS)
    assert np.abs(got - meta_forward(sd, TOKENS)).max() < 1e-4


def test_configs_override_in_order(tmp_path: Path, spm_model: bytes) -> None:
    sd = meta_weights(seed=5)
    src = write_meta(tmp_path / "m", [sd], tokenizer=spm_model)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"rope_theta": 50000.0, "max_seq_len": 256,
                             "rope_scaling": {"type": "dynamic", "factor": 8.0}}))
    b.write_text(json.dumps({"rope_theta": 20000.0, "rope_scaling.type": "linear",
                             "rope_scaling.factor": 2.0}))
    out = convert(src, tmp_path / "ab.gguf", "f32", configs=[a, b], progress=False)
    md = GGUFReader(out).metadata
    assert md["llama.rope.freq_base"] == pytest.approx(20000.0)
    assert md["llama.context_length"] == 256
    assert md["llama.rope.scaling.type"] == "linear"
    assert md["llama.rope.scaling.factor"] == pytest.approx(2.0)
    want = meta_forward(sd, TOKENS, theta=20000.0, linear=2.0)
    assert np.abs(LlamaRef(str(out)).forward(TOKENS) - want).max() < 1e-4
    out = convert(src, tmp_path / "ba.gguf", "f32", configs=[b, a], progress=False)
    md = GGUFReader(out).metadata
    assert md["llama.rope.freq_base"] == pytest.approx(50000.0)
    assert md["llama.rope.scaling.type"] == "dynamic"
    assert md["llama.rope.scaling.factor"] == pytest.approx(8.0)


def test_llama31_scaled_rope(base: tuple[Any, Path], tmp_path: Path) -> None:
    """Llama 3.1's params.json: ``use_scaled_rope`` -> llama.cpp's rope_freqs factors."""
    sd = base[0]
    src = write_meta(tmp_path / "m", [sd], {**PARAMS, "rope_theta": 500000.0,
                                            "use_scaled_rope": True})
    out = convert_meta(src, tmp_path / "m.gguf", "f32", progress=False)
    names = [t.name for t in GGUFReader(out).tensors]
    assert "rope_freqs.weight" in names
    want = meta_forward(sd, TOKENS, theta=500000.0, scaled_rope=True)
    assert np.abs(LlamaRef(str(out)).forward(TOKENS) - want).max() < 1e-4
    assert np.abs(meta_forward(sd, TOKENS, theta=500000.0) - want).max() > 1e-2


FASTLLM = {
    "pre_prompt": "<FLM_FIX_TOKEN_1>A chat.\n",
    "user_role": "<FLM_FIX_TOKEN_3>Human: ",
    "bot_role": "\nBot:",
    "history_sep": "\n\n",
    "tokenizer_add_dummy_prefix": False,
    "bos_token_id": 5,
}
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": " hello"}, {"role": "user", "content": "the fox?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
]


def _check_fastllm(out: Path) -> None:
    from pyllm.chat import ChatFormat, render
    from pyllm.tokenizer import Tokenizer

    md = GGUFReader(out).metadata
    assert md["tokenizer.ggml.add_space_prefix"] is False
    assert md["tokenizer.ggml.bos_token_id"] == 5
    template = md["tokenizer.chat_template"]
    tok = Tokenizer.from_gguf(out)
    assert tok.token_to_piece(3) == "<|turn|>"  # the fixed id is a user-defined token
    fmt = ChatFormat.from_fastllm(**{k: FASTLLM[k] for k in
                                     ("pre_prompt", "user_role", "bot_role", "history_sep")})
    for msgs in CONVERSATIONS:
        for gen in (True, False):
            want = render(msgs, fmt, tokenizer=tok, add_generation_prompt=gen)
            assert render(msgs, template, tokenizer=tok, add_generation_prompt=gen) == want
    text = render(CONVERSATIONS[0], template, tokenizer=tok)
    assert text == "<s>A chat.\n<|turn|>Human: hi\nBot:"
    assert tok.encode(text, add_special=False, parse_special=True)[0:1] == [1]


def test_fastllm_overrides_meta(base: tuple[Any, Path], tmp_path: Path, spm_model: bytes) -> None:
    src = write_meta(tmp_path / "m", [base[0]], tokenizer=spm_model)
    cfg = tmp_path / "fastllm.json"
    cfg.write_text(json.dumps(FASTLLM))
    _check_fastllm(convert(src, tmp_path / "f.gguf", "f16", configs=[cfg], progress=False))


def test_fastllm_overrides_hf(tmp_path: Path, spm_model: bytes) -> None:
    import transformers
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1,
                                   vocab_size=VOCAB, max_position_embeddings=64)
    src = tmp_path / "hf"
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    (src / "tokenizer.model").write_bytes(spm_model)
    out = convert(src, tmp_path / "hf.gguf", "f16",
                  configs=[FASTLLM, {"rope_theta": 40000.0, "rope_scaling.type": "linear",
                                     "rope_scaling.factor": 4.0}], progress=False)
    _check_fastllm(out)
    md = GGUFReader(out).metadata
    assert md["llama.rope.freq_base"] == pytest.approx(40000.0)
    assert md["llama.rope.scaling.type"] == "linear"
    assert md["llama.rope.scaling.factor"] == pytest.approx(4.0)


def test_fastllm_overrides_are_checked(base: tuple[Any, Path], tmp_path: Path,
                                       spm_model: bytes) -> None:
    src = write_meta(tmp_path / "m", [base[0]], tokenizer=spm_model)
    for bad, match in (({"bos_token_id": VOCAB}, "outside"),
                       ({"tokenizer_add_dummy_prefix": "maybe"}, "true or false"),
                       ({"user_role": "<FLM_FIX_TOKEN_999>"}, "outside"),
                       ({"bot_role": 3}, "must be a string")):
        with pytest.raises(ConvertError, match=match):
            convert(src, tmp_path / "x.gguf", "f16", configs=[bad], progress=False)
        assert not (tmp_path / "x.gguf").exists()


def test_conversion_streams(tmp_path: Path) -> None:
    """Slices are joined one tensor at a time from memory-mapped shards: the peak of
    Python/numpy allocations stays a small fraction of the model."""
    import tracemalloc

    params = {**PARAMS, "dim": 256, "n_layers": 6, "n_heads": 8, "n_kv_heads": 4}
    sd = meta_weights(params=params, n_vocab=1024)
    total = sum(t.numel() * 4 for t in sd.values())
    src = write_meta(tmp_path / "big", split_model_parallel(sd, 2, False), params)
    del sd
    tracemalloc.start()
    try:
        convert_meta(src, tmp_path / "big.gguf", "f16", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < total / 3, (peak, total)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_shard_is_refused(base: tuple[Any, Path], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    shards = split_model_parallel(base[0], 2, False)
    shards[1]["layers.0.attention.wq.weight"] = _Evil(marker)
    src = write_meta(tmp_path / "evil", shards)
    with pytest.raises(ConvertError, match="refused"):
        convert(src, tmp_path / "evil.gguf", "f32", progress=False)
    assert not marker.exists()
    assert not (tmp_path / "evil.gguf").exists()


def test_bad_folders_are_refused(base: tuple[Any, Path], tmp_path: Path) -> None:
    sd = base[0]
    shards = split_model_parallel(sd, 2, False)
    cases: list[tuple[str, Any]] = []
    # a shard missing from the set
    src = write_meta(tmp_path / "gap", shards)
    (src / "consolidated.01.pth").rename(src / "consolidated.02.pth")
    cases.append((src, "complete model-parallel set"))
    # params.json disagrees with the weights
    cases.append((write_meta(tmp_path / "dim", [sd], {**PARAMS, "multiple_of": 64}),
                  "expected"))
    # shards holding different tensors
    odd = [dict(s) for s in shards]
    del odd[1]["layers.1.ffn_norm.weight"]
    cases.append((write_meta(tmp_path / "odd", odd), "other tensors"))
    # slices that cannot be joined
    bad = [dict(s) for s in shards]
    bad[1]["layers.0.attention.wq.weight"] = bad[1]["layers.0.attention.wq.weight"][:, :8]
    cases.append((write_meta(tmp_path / "join", bad), "do not join"))
    # replicas that differ: shards of two different models
    mixed = [dict(s) for s in shards]
    mixed[1]["norm.weight"] = mixed[1]["norm.weight"] + 1
    cases.append((write_meta(tmp_path / "mixed", mixed), "differs between shards"))
    # no output projection (Meta never ties it to the embeddings)
    cases.append((write_meta(tmp_path / "noout", [{k: v for k, v in sd.items()
                                                   if k != "output.weight"}]),
                  "no output.weight"))
    # an unknown tensor
    cases.append((write_meta(tmp_path / "lora", [{**sd, "layers.0.attention.wq_lora_a.weight":
                                                  torch.zeros(2, 2)}]), "LoRA"))
    # Llama 3's tiktoken vocabulary is named tokenizer.model too
    tik = write_meta(tmp_path / "tik", [sd])
    (tik / "tokenizer.model").write_bytes(b"IQ== 0\nIg== 1\n")
    cases.append((tik, "tiktoken"))
    # neither kind of folder
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "neither"))
    for src, match in cases:
        with pytest.raises(ConvertError, match=match):
            convert(src, tmp_path / "out.gguf", "f32", progress=False)
        assert not (tmp_path / "out.gguf").exists()


def test_cli_converts_a_meta_folder(tmp_path: Path, spm_model: bytes) -> None:
    """`pyllm convert` on a 2-shard Meta folder with two configs, then runs the result."""
    from pyllm.cli import main
    from pyllm.runtime.llm import LLM

    sd = meta_weights(seed=7)
    src = write_meta(tmp_path / "m", split_model_parallel(sd, 2, vocab_parallel=False),
                     tokenizer=spm_model)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"rope_theta": 50000.0}))
    b.write_text(json.dumps({"rope_theta": 20000.0}))
    out = tmp_path / "m.gguf"
    assert main(["convert", str(src), "-o", str(out), "--outtype", "f32", "--quiet",
                 "--config", str(a), "--config", str(b)]) == 0
    assert GGUFReader(out).metadata["llama.rope.freq_base"] == pytest.approx(20000.0)
    want = meta_forward(sd, TOKENS, theta=20000.0)
    with LLM(out, n_ctx=64, kv_type="f32") as llm:
        assert np.abs(llm.logits(TOKENS) - want).max() < 1e-3
