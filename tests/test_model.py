"""The C++ forward pass and the LLM object against the numpy reference forward."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import gguf  # noqa: F401
import numpy as np
import pytest

from pyllm.errors import ContextError, ModelError
from pyllm.formats.gguf import GGMLType, GGUFReader, GGUFWriter
from pyllm.formats.gguf.constants import TYPE_INFO
from pyllm.runtime.llm import LLM
from tests.reference import llama_ref
from tests.reference.llama_ref import LlamaRef
from tests.tiny_models import TinySpec, write_tiny

TOKENS = [1, 17, 99, 3, 42, 42, 7, 150, 88, 5, 61, 120, 9, 33, 0, 77, 64, 31, 2, 140,
          11, 23, 56, 78, 90, 101, 112, 130, 145, 159, 4, 8]

# Logits are O(1..10). With the F32 KV cache only F32 summation order separates us from the
# float64 reference; the default F16 (and the Q8_0) cache add their rounding on top.
ATOL_EXACT = 2e-4
# (max, mean) absolute error of the lossy caches; Q8_0 steps are ~20x coarser than F16's, and
# measured errors scale accordingly (f16: 0.016 / 0.0012, q8_0: 0.32 / 0.028 on head_dim_32).
ATOL_KV = {"f16": (3e-2, 3e-3), "q8_0": (0.6, 0.06)}

VARIANTS = {
    "gqa": TinySpec(),
    "mha": TinySpec(n_head_kv=4),
    "mqa": TinySpec(n_head_kv=1),
    "mqa_8_heads": TinySpec(n_head=8, n_head_kv=1),  # a GQA group as wide as kAttentionRows
    "mqa_12_heads": TinySpec(n_head=12, n_head_kv=1, head_dim=16),  # wider than a row block
    "tied": TinySpec(tied=True),
    "head_dim_32": TinySpec(head_dim=32),
    "head_dim_24": TinySpec(head_dim=24),  # not a multiple of the AVX-512 attention's 16 lanes
    "partial_rotary": TinySpec(n_rot=8),
    "qwen2_biases": TinySpec(arch="qwen2", biases=True),
    "internlm2": TinySpec(arch="internlm2"),
    "rope_base": TinySpec(rope_base=500000.0),
    "rope_linear": TinySpec(rope_scaling={"type": "linear", "factor": 4.0}),
    "rope_yarn": TinySpec(rope_scaling={"type": "yarn", "factor": 4.0,
                                        "original_context_length": 16}),
    "rope_dynamic": TinySpec(rope_scaling={"type": "dynamic", "factor": 2.0,
                                           "original_context_length": 16}),
    "rope_freqs": TinySpec(rope_freqs=True),
    "f16_weights": TinySpec(wtype=GGMLType.F16),
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


def tiny(tiny_dir: Path, name: str) -> Path:
    path = tiny_dir / f"{name}.gguf"
    if not path.exists():
        write_tiny(path, VARIANTS[name])
    return path


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_reference(tiny_dir: Path, name: str) -> None:
    path = tiny(tiny_dir, name)
    expected = LlamaRef(str(path)).forward(TOKENS)
    with LLM(path, n_ctx=64, n_threads=2, kv_type="f32") as llm:
        got = llm.logits(TOKENS)
    assert got.shape == (len(TOKENS), 160) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=ATOL_EXACT, rtol=0)


@pytest.mark.parametrize(("name", "kv_type"), [("gqa", "f16"), ("qwen2_biases", "f16"),
                                               ("rope_yarn", "f16"), ("head_dim_32", "f16"),
                                               ("head_dim_32", "q8_0")])
def test_kv_cache_types(tiny_dir: Path, name: str, kv_type: str) -> None:
    path = tiny(tiny_dir, name)
    expected = LlamaRef(str(path)).forward(TOKENS)
    with LLM(path, n_ctx=64, kv_type=kv_type) as llm:
        got = llm.logits(TOKENS)
    err = np.abs(got - expected)
    max_err, mean_err = ATOL_KV[kv_type]
    assert err.max() < max_err and err.mean() < mean_err, (err.max(), err.mean())
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def test_q8_kv_cache_needs_whole_blocks(tiny_dir: Path) -> None:
    with pytest.raises(ModelError, match="multiple of 32"):
        LLM(tiny(tiny_dir, "gqa"), n_ctx=64, kv_type="q8_0")


@pytest.mark.parametrize(
    "variant", ["gqa", "mha", "mqa", "mqa_8_heads", "mqa_12_heads", "head_dim_24"]
)
def test_incremental_decode_matches_batch(tiny_dir: Path, variant: str) -> None:
    # decode hands the heads of a GQA group to the attention kernel together (one K/V load)
    path = tiny(tiny_dir, variant)
    with LLM(path, n_ctx=64, kv_type="f32") as llm:
        full = llm.logits(TOKENS)
        llm.reset()
        for i, t in enumerate(TOKENS):
            last = llm.eval([t])
            np.testing.assert_allclose(last, full[i], atol=1e-4, rtol=0)
        assert llm.n_past == len(TOKENS)


@pytest.mark.parametrize("n_batch", [1, 5, 7])
def test_chunked_prefill_matches(tiny_dir: Path, n_batch: int) -> None:
    path = tiny(tiny_dir, "gqa")
    with LLM(path, n_ctx=64, kv_type="f32") as a, \
            LLM(path, n_ctx=64, n_batch=n_batch, kv_type="f32") as b:
        np.testing.assert_allclose(b.logits(TOKENS), a.logits(TOKENS), atol=1e-4, rtol=0)


def test_thread_counts_agree(tiny_dir: Path) -> None:
    path = tiny(tiny_dir, "gqa")
    with LLM(path, n_ctx=64, n_threads=1, kv_type="f32") as a, \
            LLM(path, n_ctx=64, n_threads=2, kv_type="f32") as b:
        assert a.n_threads == 1 and b.n_threads == 2
        np.testing.assert_allclose(b.logits(TOKENS), a.logits(TOKENS), atol=1e-5, rtol=0)


def test_prefix_reuse(tiny_dir: Path) -> None:
    path = tiny(tiny_dir, "gqa")
    with LLM(path, n_ctx=64, kv_type="f32") as llm:
        full = llm.logits(TOKENS)
        llm.reset()
        llm.eval_prompt(TOKENS[:20])
        assert llm.n_past == 20
        other = TOKENS[:12] + [3, 4, 5]
        got = llm.eval_prompt(other)
        assert llm.tokens == other
        fresh = llm.logits(other)[-1]
        np.testing.assert_allclose(got, fresh, atol=1e-4, rtol=0)
        # the same prompt again re-evaluates only its last token
        llm.reset()
        llm.eval_prompt(TOKENS)
        again = llm.eval_prompt(TOKENS)
        np.testing.assert_allclose(again, full[-1], atol=1e-4, rtol=0)


def test_save_and_load_state(tiny_dir: Path) -> None:
    path = tiny(tiny_dir, "gqa")
    with LLM(path, n_ctx=64) as llm:
        llm.eval(TOKENS[:10])
        state = llm.save_state()
        a = llm.eval(TOKENS[10:14])
        llm.reset()
        llm.eval([5, 6, 7])
        llm.load_state(state)
        assert llm.tokens == TOKENS[:10]
        b = llm.eval(TOKENS[10:14])
        np.testing.assert_array_equal(a, b)


def test_state_from_other_model_rejected(tiny_dir: Path) -> None:
    with LLM(tiny(tiny_dir, "gqa"), n_ctx=64) as a, LLM(tiny(tiny_dir, "mha"), n_ctx=64) as b:
        a.eval([1, 2, 3])
        with pytest.raises(ContextError):
            b.load_state(a.save_state())


def test_context_overflow_is_an_error(tiny_dir: Path) -> None:
    with LLM(tiny(tiny_dir, "gqa"), n_ctx=16) as llm:
        llm.eval(TOKENS[:10])
        with pytest.raises(ContextError, match="n_ctx=16"):
            llm.eval(TOKENS[:7])
        assert llm.n_past == 10  # nothing was modified
        llm.eval(TOKENS[:6])
        with pytest.raises(ContextError):
            llm.logits(TOKENS[:17])


@pytest.mark.parametrize("bad", [[-1], [160], [1, 2, 10**9], [[1, 2]], [1.5]])
def test_bad_tokens(tiny_dir: Path, bad: list[object]) -> None:
    with LLM(tiny(tiny_dir, "gqa"), n_ctx=16) as llm, pytest.raises(ModelError):
        llm.eval(bad)  # type: ignore[arg-type]


def test_two_models_in_two_threads(tiny_dir: Path) -> None:
    paths = [tiny(tiny_dir, "gqa"), tiny(tiny_dir, "qwen2_biases")]
    expected = []
    for p in paths:
        with LLM(p, n_ctx=64, n_threads=1) as llm:
            expected.append(llm.logits(TOKENS))
    results: dict[int, list[np.ndarray]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with LLM(paths[i], n_ctx=64, n_threads=1) as llm:
                for _ in range(5):
                    results[i].append(llm.logits(TOKENS))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        for r in results[i]:
            np.testing.assert_allclose(r, expected[i], atol=1e-5, rtol=0)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gptx.gguf"
    w = GGUFWriter(path)
    w.add_kv("general.architecture", "gptx")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write()
    with pytest.raises(ModelError, match="unsupported architecture 'gptx'"):
        LLM(path)


def test_missing_tensor(tmp_path: Path, tiny_dir: Path) -> None:
    src = GGUFReader(tiny(tiny_dir, "gqa"))
    path = tmp_path / "missing.gguf"
    w = GGUFWriter(path)
    w.add_metadata(src.metadata, src.value_types)
    for t in src.tensors:
        if t.name != "blk.1.ffn_up.weight":
            w.add_tensor(t.name, t.raw, t.type, t.dims)
    w.write()
    with pytest.raises(ModelError, match="blk.1.ffn_up.weight"):
        LLM(path)


def test_wrong_shape_rejected(tmp_path: Path, tiny_dir: Path) -> None:
    src = GGUFReader(tiny(tiny_dir, "gqa"))
    path = tmp_path / "shape.gguf"
    w = GGUFWriter(path)
    w.add_metadata(src.metadata, src.value_types)
    for t in src.tensors:
        if t.name == "blk.0.attn_k.weight":
            w.add_tensor(t.name, np.zeros((8, 64), np.float32))
        else:
            w.add_tensor(t.name, t.raw, t.type, t.dims)
    w.write()
    with pytest.raises(ModelError, match="attn_k"):
        LLM(path)


def test_bad_constructor_arguments(tiny_dir: Path) -> None:
    path = tiny(tiny_dir, "gqa")
    for kwargs in ({"n_ctx": 0}, {"n_batch": -1}, {"n_threads": 0}, {"kv_type": "f8"}):
        with pytest.raises(ContextError):
            LLM(path, **kwargs)  # type: ignore[arg-type]


def test_kv_type_names_are_checked_once_in_python(tiny_dir: Path) -> None:
    """A kv_type that is not a name (an int, an enum value) is a one-line ContextError too."""
    path = tiny(tiny_dir, "gqa")
    for bad in (1, None, [], "Q8_0", "q8_0 "):
        with pytest.raises(ContextError, match=r"^kv_type must be one of \['f16', 'f32', 'q8_0'\]"):
            LLM(path, kv_type=bad)  # type: ignore[arg-type]


def test_python_names_are_the_bound_cpp_enums() -> None:
    """kv_type and rope scaling cross into C++ as the bound enums, looked up by the names pyllm
    accepts; both name lists and the default KV type are the C++ ones."""
    from pyllm import _core
    from pyllm.formats.arch import ROPE_SCALING
    from pyllm.runtime.footprint import DEFAULT_KV_TYPE, KV_ELEMENT_TYPES

    assert tuple(_core.KVType.__members__) == tuple(KV_ELEMENT_TYPES)
    assert _core.DEFAULT_KV_TYPE.name == DEFAULT_KV_TYPE
    assert tuple(_core.RopeScaling.__members__) == ROPE_SCALING


def test_context_takes_the_enum_not_an_int(tiny_dir: Path) -> None:
    """The binding has no int range check to get wrong: only a KVType member converts."""
    from pyllm import _core

    with LLM(tiny(tiny_dir, "gqa"), n_ctx=16) as llm:
        assert _core.Context(llm._model, n_ctx=16, kv_type=_core.KVType.f32).n_ctx == 16
        with pytest.raises(TypeError):
            _core.Context(llm._model, n_ctx=16, kv_type=1)
        hp = llm.hparams.to_core(_core)
        assert hp.rope_scaling == _core.RopeScaling.none
        with pytest.raises(TypeError):
            hp.rope_scaling = 0


def test_hparams_fields_are_the_bound_cpp_fields() -> None:
    """pyllm.formats.arch.HParams and the C++ HParams (bound field by field) have the same fields,
    so a field added on one side only fails here; to_core copies every one of them."""
    from dataclasses import fields

    from pyllm import _core
    from pyllm.formats.arch import HParams

    bound = {name for name, v in vars(_core.HParams).items() if isinstance(v, property)}
    assert {f.name for f in fields(HParams)} == bound
    hp = HParams(arch="qwen2", n_vocab=11, n_embd=12, n_layer=13, n_head=14, n_head_kv=7,
                 head_dim=16, n_ff=17, n_rot=8, n_ctx_train=19, rms_eps=0.25, rope_base=21.5,
                 rope_neox=True, rope_scaling="yarn", rope_factor=2.5, rope_orig_ctx=23,
                 yarn_beta_fast=24.5, yarn_beta_slow=0.5, yarn_attn_factor=0.75,
                 yarn_ext_factor=0.125)
    core = hp.to_core(_core)
    for f in fields(HParams):
        got = getattr(core, f.name)
        assert (got.name if f.name == "rope_scaling" else got) == getattr(hp, f.name), f.name
    with pytest.raises(ModelError, match="n_embd = 4294967296 is out of range"):
        dataclasses.replace(hp, n_embd=2**32).to_core(_core)


def test_tensor_names_map_onto_the_cpp_weight_slots() -> None:
    """The GGUF names live only in pyllm.formats.arch, mapped onto the C++ slot names; the slots are
    exactly the C++ ones (a slot renamed on one side only fails here)."""
    from pyllm import _core
    from pyllm.formats.arch import (
        LAYER_TENSORS,
        MODEL_TENSORS,
        OPTIONAL_LAYER_TENSORS,
        OPTIONAL_MODEL_TENSORS,
    )

    model_slots = [*MODEL_TENSORS.values(), *OPTIONAL_MODEL_TENSORS.values()]
    layer_slots = [*LAYER_TENSORS.values(), *OPTIONAL_LAYER_TENSORS.values()]
    assert sorted(model_slots) == sorted(_core.MODEL_WEIGHT_SLOTS)
    assert sorted(layer_slots) == sorted(_core.LAYER_WEIGHT_SLOTS)


def test_cpp_model_checks_what_python_hands_it(tiny_dir: Path) -> None:
    """Defence in depth behind pyllm.formats.arch: C++ names the file's tensor in a shape error, the
    layer and slot of a missing one, and rejects slot names it does not have."""
    from pyllm import _core
    from pyllm.formats.arch import collect_tensors

    with LLM(tiny(tiny_dir, "gqa"), n_ctx=16) as llm:
        hp, t = llm.hparams.to_core(_core), collect_tensors(llm._reader, llm.hparams)
        layers = [dict(layer) for layer in t.layers]
        assert _core.Model(hp, t.model, layers).n_layer == len(layers)
        wk = layers[0]["wk"]
        layers[0]["wk"] = (wk[0], wk[1], wk[2], wk[3] // 2, wk[4])
        with pytest.raises(ValueError, match=r"^blk\.0\.attn_k\.weight: shape \d+x\d+, expected"):
            _core.Model(hp, t.model, layers)
        layers[0] = {k: v for k, v in t.layers[0].items() if k != "w_up"}
        with pytest.raises(ValueError, match="^missing tensor for layer 0 w_up$"):
            _core.Model(hp, t.model, layers)
        layers[0] = {**t.layers[0], "attn_q.weight": t.layers[0]["wq"]}
        with pytest.raises(ValueError, match="^layer 0 unknown weight slot 'attn_q.weight'$"):
            _core.Model(hp, t.model, layers)
        with pytest.raises(ValueError, match="layers were given"):
            _core.Model(hp, t.model, layers[:1])


def test_closed_llm(tiny_dir: Path) -> None:
    llm = LLM(tiny(tiny_dir, "gqa"), n_ctx=16)
    llm.close()
    with pytest.raises(ModelError, match="closed"):
        llm.eval([1])


@pytest.mark.slow
def test_smollm2_matches_reference(smollm2_path: Path) -> None:
    tokens = [1, 504, 3458, 282, 4649, 314, 253, 1345]
    expected = LlamaRef(str(smollm2_path), dtype=np.float32).forward(tokens).astype(np.float64)
    p = np.exp(expected - expected.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    for repack in (False, True):  # 8 tokens: the matvec kernels, GGUF-layout and rows16
        with LLM(smollm2_path, n_ctx=64, repack=repack) as llm:
            got = llm.logits(tokens).astype(np.float64)
        assert got.shape == (len(tokens), 49152)
        # The int16 activation rounding (matmul.h) leaves ~1e-4 of relative noise per matmul;
        # through 30 layers the largest logit (~22) moves by 0.015-0.03 depending on which
        # blocks a kernel rounds (measured: GGUF-layout 0.015, rows16 0.027), while the
        # distributions stay ~1e-6 apart in KL (the bar is 1.5e-3, tests/test_kl.py).
        assert np.abs(got - expected).max() < 2e-3 * np.abs(expected).max()
        lq = got - got.max(-1, keepdims=True)
        lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
        kl = (p * (np.log(p) - lq)).sum(-1).mean()
        assert kl < 1e-5, f"repack={repack}: KL {kl:.3g}"
        assert (got.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.parametrize("wtype", ["BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
                                   "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0"])
def test_quantized_weights_match_reference(tmp_path: Path, wtype: str) -> None:
    """Every weight type through the whole forward (k-quants need rows of 256)."""
    spec = TinySpec(n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_layer=1,
                    wtype=GGMLType[wtype])
    path = write_tiny(tmp_path / f"{wtype}.gguf", spec)
    assert {t.type.name for t in GGUFReader(path).tensors if len(t.dims) == 2} == {wtype}
    expected = LlamaRef(str(path)).forward(TOKENS[:12])
    with LLM(path, n_ctx=32, kv_type="f32") as llm:
        got = llm.logits(TOKENS[:12])
        llm.reset()
        last = llm.eval(TOKENS[:12])
    # The AVX-512 VNNI kernels round activations to int16 steps (amax / 32767 per block of 32);
    # through a layer that is ~1e-3 of the largest logit here (F32-math ISAs: ~4e-6). The real
    # accuracy bar is tests/test_kl.py.
    tol = 3e-3 * np.abs(expected).max()
    np.testing.assert_allclose(got, expected, atol=tol, rtol=0)
    np.testing.assert_allclose(last, expected[-1], atol=tol, rtol=0)


# Relative bound (max |logit error| / max |logit|) for the types whose only kernels are F32 math
# on every ISA: measured 3e-7 .. 1.9e-6 (AVX-512 machine, all nine types), 5x margin.
F32_MATH_LOGIT_RTOL = 1e-5
# The same with the AVX-512 int16-activation decode kernels of these types (matvec_vnni_iq.cc:
# activations rounded to amax / 32767 per block of 32): measured 5.8e-5 .. 3.1e-4, 5x margin.
INT16_LOGIT_RTOL = 1.5e-3


@pytest.mark.parametrize("wtype", ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S",
                                   "IQ1_M", "TQ1_0", "TQ2_0"])
def test_random_block_weights_match_reference(tmp_path: Path, wtype: str) -> None:
    """Files of the grid i-quants (which pyllm cannot quantize to) and the ternary types, every
    matrix random valid blocks with sane scales, through the whole forward: logits within
    F32_MATH_LOGIT_RTOL of the float64 reference reading the same file through gguf's
    dequantization on an F32-math ISA (AVX2 where there is one: measured 2.4e-7 .. 3.3e-6 of the
    largest logit) and, if it is another, on the active ISA (AVX-512: int16 activations in
    decode, within INT16_LOGIT_RTOL). Negative control, on the F32-math ISA: one flipped bit in
    one code byte of one block of one matrix moves the logits by 4.2e-3 .. 3.1e-2 of the largest
    logit (measured), far outside the F32 bound."""
    from pyllm import _core

    spec = TinySpec(n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_layer=1,
                    wtype=GGMLType[wtype], random_blocks=True)
    path = write_tiny(tmp_path / f"{wtype}.gguf", spec)
    assert {t.type.name for t in GGUFReader(path).tensors if len(t.dims) == 2} == {wtype}
    expected = LlamaRef(str(path)).forward(TOKENS[:12])
    scale = np.abs(expected).max()
    isa_before = _core.active_isa()
    f32_isa = "avx2" if "avx2" in _core.available_isas() else "scalar"  # F32 math for these types
    try:
        for isa in dict.fromkeys([isa_before, f32_isa]):
            _core.set_active_isa(isa)
            rtol = INT16_LOGIT_RTOL if isa == "avx512" else F32_MATH_LOGIT_RTOL
            with LLM(path, n_ctx=32, kv_type="f32") as llm:
                got = llm.logits(TOKENS[:12])
                llm.reset()
                last = llm.eval(TOKENS[:12])
            assert np.abs(got - expected).max() <= rtol * scale, isa
            assert np.abs(last - expected[-1]).max() <= rtol * scale, isa
        _core.set_active_isa(f32_isa)
        _random_block_control(tmp_path, wtype, path, expected, scale)
    finally:
        _core.set_active_isa(isa_before)


def _random_block_control(tmp_path: Path, wtype: str, path: Path, expected: np.ndarray,
                          scale: float) -> None:
    # The same file with bit 7 of the first code byte of block 5 of blk.0.ffn_down flipped (a
    # grid index moves by 128 rows; a ternary byte changes a digit).
    with GGUFReader(path) as reader:
        t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
        before = llama_ref.dequantize_tensor(t)
        code = 2 if wtype in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S") else 0
        pos = t.offset + 5 * TYPE_INFO[t.type].type_size + code
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x80
    other = tmp_path / f"{wtype}-other.gguf"
    other.write_bytes(bytes(data))
    with GGUFReader(other) as reader:
        t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
        changed = np.any(llama_ref.dequantize_tensor(t) != before, axis=1)
    assert changed.sum() == 1  # one row, one block of it: the control is real and small
    with LLM(other, n_ctx=32, kv_type="f32") as llm:
        moved = llm.logits(TOKENS[:12])
    assert np.abs(moved - expected).max() > 10 * F32_MATH_LOGIT_RTOL * scale


def test_batched_sequences_match_separate_runs(tiny_dir: Path) -> None:
    """Continuous batching: several sequences in one forward equal each run on its own."""
    from pyllm import _core

    path = tiny(tiny_dir, "gqa")
    seqs = [TOKENS[:9], TOKENS[5:19], TOKENS[11:14]]
    with LLM(path, n_ctx=64, kv_type="f32") as llm:
        expected = [llm.logits(s) for s in seqs]
        ctx = _core.Context(llm._model, n_ctx=32, n_batch=64, kv_type=_core.KVType.f32, n_seq=3)
    # step 1: every prompt but its last token, all sequences mixed in one call
    toks = [t for s in seqs for t in s[:-1]]
    ids = [i for i, s in enumerate(seqs) for _ in s[:-1]]
    want = [0] * len(toks)
    assert ctx.decode_batch(np.array(toks), np.array(ids), np.array(want)).shape == (0, 160)
    # step 2: the last token of each, logits for all three
    out = ctx.decode_batch(np.array([s[-1] for s in seqs]), np.arange(3), np.ones(3))
    for i, s in enumerate(seqs):
        assert ctx.seq_n_past(i) == len(s)
        np.testing.assert_allclose(out[i], expected[i][-1], atol=1e-4, rtol=0)
    # freeing one slot and reusing it does not disturb the others
    ctx.seq_truncate(1, 0)
    out = ctx.decode_batch(np.array(seqs[2][:1] + [7]), np.array([1, 0]), np.ones(2))
    np.testing.assert_allclose(out[0], expected[2][0], atol=1e-4, rtol=0)
    with pytest.raises(IndexError):
        ctx.decode_batch(np.array([1] * 40), np.zeros(40), np.zeros(40))
    with pytest.raises(ValueError):
        ctx.decode_batch(np.array([1]), np.array([3]), np.array([1]))


def test_embeddings_are_mean_pooled_final_states(tiny_dir: Path) -> None:
    path = tiny(tiny_dir, "gqa")
    trace: dict[str, np.ndarray] = {}
    LlamaRef(str(path)).forward(TOKENS, trace=trace)
    expected = trace["result_norm"].mean(axis=0)
    with LLM(path, n_ctx=64, n_batch=7, kv_type="f32") as llm:
        llm.eval([1, 2, 3])
        raw = llm.embed(TOKENS, normalize=False)
        np.testing.assert_allclose(raw, expected, atol=1e-4, rtol=0)
        unit = llm.embed(TOKENS)
        np.testing.assert_allclose(unit, expected / np.linalg.norm(expected), atol=1e-5)
        assert llm.n_past == 0  # the cache was reused for the embedding
        np.testing.assert_allclose(llm.eval(TOKENS[:3]), llm.logits(TOKENS[:3])[-1], atol=1e-4)
        with pytest.raises(ContextError):
            llm.embed(list(range(65)))


# ---- RoPE scaling beyond 512 positions -------------------------------------------------------

# Every scaling mode of pyllm/formats/arch.py (ROPE_SCALING) plus Llama-3 style frequency factors
# (rope_freqs.weight). The trained context is set above N_LONG so no warning fires; YaRN and
# dynamic NTK scale relative to their original context of 256.
ROPE_MODES = {
    "none": TinySpec(ctx=2048),
    "linear": TinySpec(ctx=2048, rope_scaling={"type": "linear", "factor": 4.0}),
    "yarn": TinySpec(ctx=2048, rope_scaling={"type": "yarn", "factor": 4.0,
                                             "original_context_length": 256}),
    "dynamic": TinySpec(ctx=2048, rope_scaling={"type": "dynamic", "factor": 2.0,
                                                "original_context_length": 256}),
    "freq_factors": TinySpec(ctx=2048, rope_freqs=True),
}
ORIG_CTX = 256
# Past the 512-token default chunk and the 1024-score blocks of the softmax (fast_exp.h).
N_LONG = 1040
LONG_TOKENS = [int(t) for t in np.random.default_rng(2).integers(0, 160, N_LONG)]
# Logits are O(1..8); measured over all modes: batch vs reference <= 3.4e-5, decode vs batch
# <= 3.8e-5 (matvec vs matmat summation order), prefill in separate calls vs batch 1.9e-6,
# chunks in one call vs batch 0: a 4x margin over the largest.
ATOL_LONG = 1.5e-4
_REF_INV_FREQ = llama_ref.rope_inv_freq


def _unscaled_inv_freq(p: Any, n_pos: int, freq_factors: np.ndarray | None = None
                       ) -> tuple[np.ndarray, float]:
    """The reference's rope frequencies with scaling and frequency factors switched off."""
    return _REF_INV_FREQ(dataclasses.replace(p, scaling_type="none"), n_pos, None)


@pytest.fixture(scope="module")
def rope_runs(tiny_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """Per mode: the reference, the reference without scaling, one batched forward of all
    N_LONG tokens, chunks of 97 in one call, chunks of 97 in separate calls, decode, and the
    batch and reference of the first ORIG_CTX tokens."""
    out = {}
    for name, spec in ROPE_MODES.items():
        path = write_tiny(tiny_dir / f"rope_{name}.gguf", spec)
        runs = {"ref": LlamaRef(str(path)).forward(LONG_TOKENS)}
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(llama_ref, "rope_inv_freq", _unscaled_inv_freq)
            runs["unscaled_ref"] = LlamaRef(str(path)).forward(LONG_TOKENS)
        with LLM(path, n_ctx=N_LONG, n_batch=N_LONG, n_threads=2, kv_type="f32") as llm:
            runs["batch"] = llm.logits(LONG_TOKENS)
            llm.reset()
            runs["decode"] = np.stack([llm.eval([t]) for t in LONG_TOKENS])
            llm.reset()
            # prefill in separate calls: the logits after each call's last token
            runs["calls"] = np.stack([llm.eval(LONG_TOKENS[i:i + 97])
                                      for i in range(0, N_LONG, 97)])
            llm.reset()
            runs["batch_orig"] = llm.logits(LONG_TOKENS[:ORIG_CTX])
        runs["ref_orig"] = LlamaRef(str(path)).forward(LONG_TOKENS[:ORIG_CTX])
        with LLM(path, n_ctx=N_LONG, n_batch=97, n_threads=2, kv_type="f32") as llm:
            runs["chunks"] = llm.logits(LONG_TOKENS)
        out[name] = runs
    return out


@pytest.mark.parametrize("mode", sorted(ROPE_MODES))
def test_rope_scaling_batch_matches_reference(rope_runs: dict[str, dict[str, np.ndarray]],
                                              mode: str) -> None:
    r = rope_runs[mode]
    np.testing.assert_allclose(r["batch"], r["ref"], atol=ATOL_LONG, rtol=0)
    np.testing.assert_allclose(r["chunks"], r["batch"], atol=ATOL_LONG, rtol=0)
    if mode == "none":
        np.testing.assert_array_equal(r["unscaled_ref"], r["ref"])
    else:  # the scaling is applied: without it the logits are far off
        assert np.abs(r["batch"] - r["unscaled_ref"]).max() > 1000 * ATOL_LONG


@pytest.mark.parametrize("mode", sorted(set(ROPE_MODES) - {"dynamic"}))
def test_rope_scaling_decode_matches_batch(rope_runs: dict[str, dict[str, np.ndarray]],
                                           mode: str) -> None:
    r = rope_runs[mode]
    np.testing.assert_allclose(r["decode"], r["batch"], atol=ATOL_LONG, rtol=0)
    ends = [min(i + 97, N_LONG) - 1 for i in range(0, N_LONG, 97)]
    np.testing.assert_allclose(r["calls"], r["batch"][ends], atol=ATOL_LONG, rtol=0)


def test_dynamic_ntk_decode(rope_runs: dict[str, dict[str, np.ndarray]]) -> None:
    """Dynamic NTK grows the base with the sequence length once it passes the original context.
    Up to that length decode and a batch agree; beyond it each decode step rotates its key with
    the base of its own length and keeps it in the cache (as transformers' cache does), while a
    single batch rotates every position with the base of its full length, so they differ."""
    r = rope_runs["dynamic"]
    np.testing.assert_allclose(r["decode"][:ORIG_CTX], r["batch_orig"], atol=ATOL_LONG, rtol=0)
    np.testing.assert_allclose(r["batch_orig"], r["ref_orig"], atol=ATOL_LONG, rtol=0)
    assert np.abs(r["decode"][ORIG_CTX:] - r["batch"][ORIG_CTX:]).max() > 1000 * ATOL_LONG


def test_one_loaded_model_many_checked_contexts(tiny_dir: Path) -> None:
    """The weights are loaded once (LoadedModel) and contexts made from them with the same
    checks whoever asks: a 2-sequence context from the model gives the logits of an LLM's
    single-sequence context, and the kv_type, count, memory and training-length checks all
    happen in new_context (the server's engine used to repeat them on its own)."""
    from pyllm.errors import PyllmWarning
    from pyllm.runtime.loaded import LoadedModel

    path = tiny(tiny_dir, "gqa")
    with LLM(path, n_ctx=64, kv_type="f32") as llm:
        assert isinstance(llm.model, LoadedModel) and llm._model is llm.model.core
        expected = llm.logits(TOKENS[:9])
    with LoadedModel(path) as model:
        ctx = model.new_context(32, n_batch=1000, kv_type="f32", n_seq=2)
        assert (ctx.n_ctx, ctx.n_seq) == (32, 2)
        out = ctx.decode_batch(np.array(TOKENS[:9]), np.ones(9), np.eye(9)[-1])
        np.testing.assert_allclose(out[0], expected[-1], atol=1e-4, rtol=0)
        with pytest.raises(ContextError, match="^kv_type must be one of"):
            model.new_context(16, kv_type="q4_0")
        with pytest.raises(ContextError, match="^n_seq must be a positive integer"):
            model.new_context(16, n_seq=0)
        with pytest.raises(ContextError, match=r"x 1000 sequences needs .* is available"):
            model.new_context(1_000_000, n_seq=1000)
        n_long = model.hparams.n_ctx_train + 1
        with pytest.warns(PyllmWarning, match="exceeds the") as seen:
            model.new_context(n_long, kv_type="f32")
        assert seen[0].filename == __file__  # the warning points at the caller's line
    with pytest.warns(PyllmWarning, match="exceeds the") as seen:
        LLM(path, n_ctx=n_long).close()
    assert seen[0].filename == __file__
    with pytest.raises(ModelError, match="closed"):
        model.new_context(16)
