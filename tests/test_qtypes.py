"""Quantization formats (pyllm.formats.qtypes over the C++ reference routines).

References: the ``gguf`` package (numpy) for every dequantization and for quantizing F16, BF16,
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, TQ1_0 and TQ2_0, which must all match bit for bit; llama.cpp for
the k-quants, whose quantizers the gguf package lacks. The grid i-quants (IQ1_*, IQ2_*, IQ3_*)
are read-only: quantizing to them raises QuantError (tests/test_iquants_grid.py has the rest).

K-quant round-trip RMSE on Gaussian data, ``default_rng(20261123).standard_normal((64, 4096))``
in float32 (262144 values, each row quantized as one tensor row):

    type   llama.cpp   pyllm      ratio
    Q2_K   0.296141    0.296141   1.00000
    Q3_K   0.150615    0.150615   1.00000
    Q4_K   0.071187    0.071187   1.00000
    Q5_K   0.036092    0.036092   1.00000
    Q6_K   0.017698    0.017698   1.00000

llama.cpp was measured with ggml-qtypes.c of the llama.cpp vendored in llama-cpp-python 0.3.36
(ggml 0.25.3, commit 0c1e570), built as a small shared library and driven through ctypes:
``quantize_q{2..6}_K(src, dst, nrows=64, n_per_row=4096, imatrix=NULL)`` (the path
llama_model_quantize takes without an importance matrix) and ``dequantize_row_q*_K``. pyllm's
quantizers produced byte-identical blocks there, hence the equal figures. The test asserts
pyllm's RMSE <= llama.cpp's figure x 1.02 and does not need llama.cpp at run time.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import gguf
import gguf.quants as gguf_quants
import numpy as np
import pytest

from pyllm import _core
from pyllm.errors import QuantError
from pyllm.formats import qtypes
from pyllm.formats.gguf.constants import TYPE_INFO, GGMLType

GQT = gguf.GGMLQuantizationType

# Weight types: both directions are checked against gguf where gguf implements them.
WEIGHT_TYPES = [
    GGMLType.F32, GGMLType.F16, GGMLType.BF16,
    GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
    GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
    GGMLType.IQ4_NL, GGMLType.IQ4_XS,
    GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S, GGMLType.IQ3_XXS, GGMLType.IQ3_S,
    GGMLType.IQ1_S, GGMLType.IQ1_M, GGMLType.TQ1_0, GGMLType.TQ2_0,
]  # fmt: skip
# Weight types pyllm quantizes only with an importance matrix (as llama.cpp's quantizer).
GRID_IQ_TYPES = [GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ1_S]
EXACT_QUANTIZE_TYPES = [
    GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1,
    GGMLType.Q8_0, GGMLType.TQ1_0, GGMLType.TQ2_0,
]  # fmt: skip
K_TYPES = [GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]

# llama.cpp's round-trip RMSE on GAUSS (see the module docstring).
LLAMA_CPP_RMSE = {
    GGMLType.Q2_K: 0.296141,
    GGMLType.Q3_K: 0.150615,
    GGMLType.Q4_K: 0.071187,
    GGMLType.Q5_K: 0.036092,
    GGMLType.Q6_K: 0.017698,
}
GAUSS = np.random.default_rng(20261123).standard_normal((64, 4096)).astype(np.float32)

# Byte offsets of the f16 scale fields in each block layout (random bytes there could be NaN/inf).
F16_FIELDS = {
    GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
    GGMLType.Q8_0: (0,), GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,),
    GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,),
    GGMLType.IQ4_NL: (0,), GGMLType.IQ4_XS: (0,),
    GGMLType.IQ2_XXS: (0,), GGMLType.IQ2_XS: (0,), GGMLType.IQ2_S: (0,), GGMLType.IQ3_XXS: (0,),
    GGMLType.IQ3_S: (0,), GGMLType.IQ1_S: (0,), GGMLType.TQ1_0: (52,), GGMLType.TQ2_0: (64,),
    GGMLType.IQ1_M: (),  # no f16 field: its d is spread over the top nibbles of 4 scale words
}  # fmt: skip
IQ1M_SCALE_WORDS = 48  # byte offset of IQ1_M's four uint16 scale words


def set_iq1m_d(raw: np.ndarray, d: np.ndarray) -> None:
    """Store f16 values d (one per block of raw) in IQ1_M's spread scale: nibble w of d is the
    top nibble of scale word w."""
    h = np.asarray(d, np.float16).reshape(-1).view(np.uint16)
    words = raw[:, IQ1M_SCALE_WORDS : IQ1M_SCALE_WORDS + 8].copy().view(np.uint16)
    for w in range(4):
        words[:, w] = (words[:, w] & 0x0FFF) | (((h >> (4 * w)) & 0xF) << 12)
    raw[:, IQ1M_SCALE_WORDS : IQ1M_SCALE_WORDS + 8] = words.view(np.uint8)


def gguf_dequantize(t: GGMLType, raw: np.ndarray) -> np.ndarray:
    return np.asarray(gguf_quants.dequantize(raw, GQT(int(t))), dtype=np.float32)


def gguf_quantize_bytes(t: GGMLType, x: np.ndarray) -> np.ndarray:
    q = np.asarray(gguf_quants.quantize(x, GQT(int(t))))
    return q.view(np.uint8).reshape(*x.shape[:-1], -1)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def random_blocks(t: GGMLType, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw blocks whose float fields are finite (sane scales, as real tensors have)."""
    info = qtypes.type_info(t)
    raw = rng.integers(0, 256, size=(n_blocks, info.type_size), dtype=np.uint8)
    if t == GGMLType.F32:
        return (rng.standard_normal((n_blocks, 1)) * 10).astype(np.float32).view(np.uint8)
    if t == GGMLType.F16:
        return (rng.standard_normal((n_blocks, 1)) * 10).astype(np.float16).view(np.uint8)
    if t == GGMLType.BF16:
        f = (rng.standard_normal((n_blocks, 1)) * 10).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    for off in F16_FIELDS[t]:
        scale = (rng.standard_normal((n_blocks, 1)) * 0.05).astype(np.float16)
        raw[:, off : off + 2] = scale.view(np.uint8)
    if t == GGMLType.IQ1_M:
        set_iq1m_d(raw, rng.standard_normal(n_blocks) * 0.05)
    return raw


# ---- the type table --------------------------------------------------------------------------


def test_type_table_matches_gguf() -> None:
    assert [int(t) for t in qtypes.supported_types()] == list(_core.quant_type_ids())
    # the weight types derived from the C++ table are exactly the ones this test expects
    assert qtypes.weight_types() == frozenset(WEIGHT_TYPES)
    for t in qtypes.supported_types():
        info = qtypes.type_info(t)
        assert info.name == t.name and info.type == t
        if t == GGMLType.Q8_1:
            # ggml's block_q8_1 holds d and s as f16 (36 bytes); gguf's size table still says 40
            # from when they were float32. Q8_1 is an activation type and never stored in files.
            assert (info.block_size, info.type_size) == (32, 36)
            continue
        assert (info.block_size, info.type_size) == gguf.GGML_QUANT_SIZES[GQT(int(t))]
        table = TYPE_INFO[t]
        assert (info.block_size, info.type_size) == (table.block_size, table.type_size)
        assert info.is_quantized == (info.block_size > 1)
        # activation types are the only ones no kernel reads
        assert info.is_weight == (t not in (GGMLType.Q8_1, GGMLType.Q8_K))
    dot = {t: qtypes.type_info(t).vec_dot_type for t in WEIGHT_TYPES}
    assert dot[GGMLType.F32] == GGMLType.F32
    assert dot[GGMLType.Q4_0] == dot[GGMLType.Q5_0] == dot[GGMLType.Q8_0] == GGMLType.Q8_0
    assert dot[GGMLType.Q4_1] == dot[GGMLType.Q5_1] == GGMLType.Q8_1
    assert all(dot[t] == GGMLType.Q8_K for t in K_TYPES)
    assert (dot[GGMLType.IQ4_NL], dot[GGMLType.IQ4_XS]) == (GGMLType.Q8_0, GGMLType.Q8_K)
    assert all(dot[t] == GGMLType.Q8_K
               for t in GRID_IQ_TYPES + [GGMLType.IQ3_XXS, GGMLType.IQ3_S, GGMLType.IQ2_S,
                                         GGMLType.IQ1_M, GGMLType.TQ1_0, GGMLType.TQ2_0])
    # every type can be quantized to without an importance matrix but IQ2_XXS, IQ2_XS, IQ1_S
    for t in qtypes.supported_types():
        assert qtypes.type_info(t).can_quantize == (t not in GRID_IQ_TYPES), t.name


def test_type_names_ids_and_enums_resolve() -> None:
    assert qtypes.type_info("q4_k").type == GGMLType.Q4_K
    assert qtypes.type_info(" Q8_0 ").type == GGMLType.Q8_0
    assert qtypes.type_info(12).type == GGMLType.Q4_K
    assert qtypes.type_info(np.uint32(30)).type == GGMLType.BF16
    assert qtypes.type_info(GQT.Q6_K).type == GGMLType.Q6_K  # gguf's enum is an int too
    assert qtypes.byte_shape("Q4_K", (3, 512)) == (3, 288)
    assert qtypes.type_info("Q4_0").row_bytes(64) == 36


# ---- dequantize: bit-exact with gguf ---------------------------------------------------------


@pytest.mark.parametrize("t", WEIGHT_TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks_bit_exact(t: GGMLType) -> None:
    rng = np.random.default_rng(int(t) + 1)
    info = qtypes.type_info(t)
    n_blocks = max(64, 8192 // info.block_size)
    raw = random_blocks(t, n_blocks, rng).reshape(8, -1)
    shape = (8, raw.shape[1] // info.type_size * info.block_size)
    ours = qtypes.dequantize(t, raw, shape)
    ref = gguf_dequantize(t, raw)
    assert ours.dtype == np.float32 and ours.shape == shape == ref.shape
    assert np.array_equal(bits(ours), bits(ref))


@pytest.mark.parametrize("t", WEIGHT_TYPES, ids=lambda t: t.name)
def test_dequantize_arbitrary_bytes_matches_gguf_nan_aware(t: GGMLType) -> None:
    # Fully random bytes, NaN/inf scale patterns included: never a crash, same values as gguf.
    info = qtypes.type_info(t)
    raw = np.random.default_rng(100 + int(t)).integers(0, 256, (256, info.type_size), np.uint8)
    ours = qtypes.dequantize(t, raw, (256 * info.block_size,))
    with np.errstate(all="ignore"):
        ref = gguf_dequantize(t, raw).reshape(-1)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.model
def test_dequantize_smollm2_tensors_bit_exact(smollm2_path: Path) -> None:
    from pyllm.formats.gguf import GGUFReader

    reader = GGUFReader(smollm2_path)
    by_name = {t.name: t for t in reader.tensors}
    wanted = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight",
              "blk.29.attn_v.weight", "blk.0.attn_norm.weight", "output_norm.weight"]  # fmt: skip
    seen = set()
    for name in wanted:
        info = by_name[name]
        data = info.data
        shape = info.shape
        if name == "token_embd.weight":  # 49152 rows: a slice of the memmap keeps this fast
            data, shape = data[:2048], (2048, *shape[1:])
        ours = qtypes.dequantize(info.type, data, shape)
        raw = np.asarray(data).view(np.uint8).reshape(*shape[:-1], -1)
        ref = gguf_dequantize(info.type, raw).reshape(shape)
        assert np.array_equal(bits(ours), bits(ref)), name
        seen.add(info.type)
    assert seen == {GGMLType.Q8_0, GGMLType.Q4_1, GGMLType.F32}


# ---- quantize: bit-exact with gguf for the legacy and float types -----------------------------


def awkward_rows() -> np.ndarray:
    """Gaussian rows at many scales plus blocks that exercise the edge cases of each rounding."""
    rng = np.random.default_rng(7)
    rows = [rng.standard_normal(256) * s for s in (1e-6, 1e-3, 0.02, 1.0, 30.0, 3000.0)]
    special = np.zeros(256)
    special[32:64] = 5.0  # constant block: max == min
    special[64:96] = np.tile([2.0, -2.0], 16)  # +max and -max tie (the first one wins)
    special[96:128] = np.linspace(-1, 1, 32)
    special[128:160] = rng.standard_normal(32) * 1e-8  # f16-subnormal scales
    special[160:192] = np.where(rng.random(32) < 0.5, -0.0, 0.0)
    special[192:224] = rng.integers(-8, 8, 32) * 0.25  # values exactly on quantization levels
    special[224:256] = rng.standard_normal(32) * 1e5  # scale overflows f16 (inf) as in gguf
    rows.append(special)
    more = rng.standard_normal(256)
    more[0:32] = -0.0  # all-zero block led by -0.0: the scale's sign comes from the first element
    more[32:64] = 0.0
    more[32] = -0.0
    more[64:96] = np.tile([-3.0, 3.0], 16)  # tie led by the negative value
    more[96:128] = 0.0
    more[100] = 0.7  # a single non-zero value
    more[128:160] = rng.standard_normal(32) * 6e4  # near the top of the f16 range
    more[160:192] = rng.standard_normal(32) * 1e-30  # scale underflows f16 to zero
    rows.append(more)
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("t", EXACT_QUANTIZE_TYPES, ids=lambda t: t.name)
def test_quantize_bit_exact_with_gguf(t: GGMLType) -> None:
    rng = np.random.default_rng(int(t))
    x = np.concatenate([awkward_rows(), rng.standard_normal((8, 256)).astype(np.float32)])
    with np.errstate(all="ignore"):
        ref = gguf_quantize_bytes(t, x)
    ours = qtypes.quantize(t, x)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    if t in (GGMLType.Q4_1, GGMLType.Q5_1):
        # A block whose minimum is both +0.0 and -0.0 gets either sign from numpy's min() (it
        # depends on numpy's SIMD reduction order); both decode to the same values, so only the
        # sign bit of the stored min (bit 7 of byte 3) is exempt in such blocks.
        blocks = x.reshape(-1, 32)
        zero = blocks == 0
        mixed = (blocks.min(axis=1) == 0) & (zero & np.signbit(blocks)).any(1) & (
            zero & ~np.signbit(blocks)
        ).any(1)
        assert mixed.any()  # awkward_rows() has such a block
        ours, ref = ours.reshape(len(mixed), -1).copy(), ref.reshape(len(mixed), -1).copy()
        ours[mixed, 3] &= 0x7F
        ref[mixed, 3] &= 0x7F
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("t", [GGMLType.F16, GGMLType.BF16], ids=lambda t: t.name)
def test_float_conversions_bit_exact_on_special_values(t: GGMLType) -> None:
    # Every 4099th float32 bit pattern: NaNs, infs, subnormals, halfway cases, overflow.
    x = np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32).view(np.float32)
    with np.errstate(all="ignore"):
        ref = gguf_quantize_bytes(t, x)
    ours = qtypes.quantize(t, x)
    assert np.array_equal(ours, ref)
    every_half = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.uint8)
    ref_back = gguf_dequantize(t, every_half.reshape(1, -1)).reshape(-1)
    assert np.array_equal(bits(qtypes.dequantize(t, every_half, 2**16)), bits(ref_back))


# ---- k-quants: llama.cpp-grade scale search ----------------------------------------------------


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_kquant_rmse_no_worse_than_llama_cpp(t: GGMLType) -> None:
    q = qtypes.quantize(t, GAUSS)
    back = qtypes.dequantize(t, q, GAUSS.shape)
    rmse = float(np.sqrt(np.mean((back.astype(np.float64) - GAUSS) ** 2)))
    assert rmse <= LLAMA_CPP_RMSE[t] * 1.02, (t.name, rmse)
    # gguf decodes our blocks to the same values (the layout is right, not just self-consistent).
    assert np.array_equal(bits(gguf_dequantize(t, q)), bits(back))


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_kquant_edge_blocks(t: GGMLType) -> None:
    x = np.zeros((4, 256), np.float32)
    x[1] = 3.5  # constant
    x[2, ::7] = -1e-3  # sparse, all negative
    x[3] = np.linspace(0, 100, 256)  # all positive, wide range
    back = qtypes.dequantize(t, qtypes.quantize(t, x), x.shape)
    assert np.all(np.isfinite(back))
    assert np.array_equal(back[0], np.zeros(256, np.float32))
    rel = np.abs(back[1:] - x[1:]).max(axis=1) / np.abs(x[1:]).max(axis=1)
    assert np.all(rel < {GGMLType.Q2_K: 0.5, GGMLType.Q3_K: 0.4}.get(t, 0.15)), rel


# ---- round trips and the activation types ------------------------------------------------------

# Round-trip RMSE bounds on N(0, 1) data (measured values are ~10-20 % lower; F32 is exact).
ROUNDTRIP_RMSE = {
    GGMLType.F32: 0.0, GGMLType.F16: 3e-4, GGMLType.BF16: 2e-3,
    GGMLType.Q4_0: 0.1, GGMLType.Q4_1: 0.09, GGMLType.Q5_0: 0.05, GGMLType.Q5_1: 0.045,
    GGMLType.Q8_0: 0.0065, GGMLType.Q8_1: 0.0065, GGMLType.Q8_K: 0.01,
    GGMLType.IQ4_NL: 0.0785, GGMLType.IQ4_XS: 0.079,  # measured 0.0769, 0.0775
    GGMLType.IQ3_S: 0.175, GGMLType.IQ3_XXS: 0.225,  # measured 0.167, 0.213
    # without an importance matrix (weights sigma^2 / 4 + x^2, x^2): measured 0.2677, 0.5822
    GGMLType.IQ2_S: 0.28, GGMLType.IQ1_M: 0.61,
    # ternary: Gaussian data mostly rounds to 0 (tests/test_iquants_grid.py); measured 0.8133
    GGMLType.TQ1_0: 0.83, GGMLType.TQ2_0: 0.83,
    **{t: LLAMA_CPP_RMSE[t] * 1.02 for t in K_TYPES},
}  # fmt: skip


@pytest.mark.parametrize("t", qtypes.supported_types(), ids=lambda t: t.name)
def test_round_trip(t: GGMLType) -> None:
    x = GAUSS[:8]
    if t in GRID_IQ_TYPES:  # not without an importance matrix: a typed error naming the type
        with pytest.raises(QuantError, match=f"{t.name}.*importance matrix"):
            qtypes.quantize(t, x)
        with pytest.raises(QuantError, match=f"{t.name}.*importance matrix"):
            _core.quantize(int(t), x)
        return
    q = qtypes.quantize(t, x)
    assert q.shape == qtypes.byte_shape(t, x.shape)
    back = qtypes.dequantize(t, q, x.shape)
    rmse = float(np.sqrt(np.mean((back.astype(np.float64) - x) ** 2)))
    assert rmse <= ROUNDTRIP_RMSE[t], (t.name, rmse)
    # Big inputs are split across threads by whole blocks: the bytes must not depend on that.
    rows = np.concatenate([qtypes.quantize(t, GAUSS[i : i + 1]) for i in range(8)])
    assert np.array_equal(rows, q)


def test_q8_1_and_q8_k_side_fields() -> None:
    x = GAUSS[:2]
    q81 = qtypes.quantize("Q8_1", x).reshape(-1, 36)
    d = q81[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(-1)
    s = q81[:, 2:4].copy().view(np.float16).astype(np.float32).reshape(-1)
    qs = q81[:, 4:].view(np.int8).astype(np.int32)
    q80 = qtypes.quantize("Q8_0", x).reshape(-1, 34)
    assert np.array_equal(q80[:, 0:2], q81[:, 0:2]) and np.array_equal(q80[:, 2:], q81[:, 4:])
    d32 = np.abs(x.reshape(-1, 32)).max(axis=1) / np.float32(127)
    expect_s = (qs.sum(axis=1).astype(np.float32) * d32).astype(np.float16).astype(np.float32)
    assert np.array_equal(s, expect_s) and np.all(d > 0)

    q8k = qtypes.quantize("Q8_K", x).reshape(-1, 292)
    dk = q8k[:, 0:4].copy().view(np.float32).reshape(-1)
    qk = q8k[:, 4:260].view(np.int8).astype(np.int32)
    bsums = q8k[:, 260:].copy().view(np.int16)
    assert np.array_equal(bsums, qk.reshape(-1, 16, 16).sum(axis=2))
    assert np.all(np.abs(qk) <= 127) and np.all(np.abs(qk).max(axis=1) == 127)
    blocks = x.reshape(-1, 256)
    assert np.allclose(dk, np.abs(blocks).max(axis=1) / 127 * np.sign(dk), rtol=1e-6)


# ---- inputs: buffers, memmaps, empties, threads ------------------------------------------------


def test_accepts_buffers_memmaps_and_strided_input(tmp_path: Path) -> None:
    x = GAUSS[:4, :512]
    q = qtypes.quantize("Q4_0", x)
    expect = qtypes.dequantize("Q4_0", q, x.shape)
    for data in (q.tobytes(), bytearray(q.tobytes()), memoryview(q.tobytes()), q.reshape(-1)):
        assert np.array_equal(qtypes.dequantize("Q4_0", data, x.shape), expect)
    path = tmp_path / "w.bin"
    q.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=q.shape)  # read-only, not copied
    assert np.array_equal(qtypes.dequantize(GGMLType.Q4_0, mm, x.shape), expect)
    del mm
    strided = np.asfortranarray(GAUSS[:4, :512])
    assert np.array_equal(qtypes.quantize("Q4_0", strided), q)
    assert np.array_equal(qtypes.quantize("Q4_0", x.astype(np.float64)), q)


def test_empty_tensors() -> None:
    assert qtypes.quantize("Q4_K", np.zeros((0, 256), np.float32)).shape == (0, 144)
    assert qtypes.dequantize("Q4_K", b"", (0, 256)).shape == (0, 256)
    assert qtypes.dequantize("F16", b"", (0,)).shape == (0,)


def test_concurrent_calls_agree() -> None:
    expect = qtypes.quantize("Q4_K", GAUSS[:16])
    results: list[np.ndarray] = []

    def work() -> None:
        results.append(qtypes.quantize("Q4_K", GAUSS[:16]))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(results) == 4 and all(np.array_equal(r, expect) for r in results)


def other_thread_runs_during(call: Callable[[], object], max_calls: int = 1000) -> bool:
    """Whether another Python thread gets to run while ``call`` runs in this one.

    The switch interval is raised far beyond the test's length, so the interpreter never takes
    the GIL away from this thread by itself: the watcher thread can only run when ``call`` lets
    go of it. ``call`` is repeated until the watcher has run (or ``max_calls`` times, so the
    answer does not hang on how soon the OS wakes the watcher); the watcher records whether
    this thread was still inside its calls. No clock is read."""
    go = threading.Event()
    in_calls = [False]
    saw: list[bool] = []

    def watcher() -> None:
        go.wait()
        saw.append(in_calls[0])

    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        thread = threading.Thread(target=watcher)
        thread.start()
        in_calls[0] = True
        go.set()  # the watcher is runnable from here on, but needs the GIL
        for _ in range(max_calls):
            call()
            if saw:
                break
        in_calls[0] = False
        thread.join()  # blocks, so a watcher that never ran gets the GIL here
    finally:
        sys.setswitchinterval(old)
    assert len(saw) == 1
    return saw[0]


def test_gil_probe_controls() -> None:
    # hashlib drops the GIL for buffers of 2 KiB and more; sum over a range never does.
    data = bytes(1 << 20)
    assert other_thread_runs_during(lambda: hashlib.sha256(data).digest())
    assert not other_thread_runs_during(lambda: sum(range(20_000)), max_calls=50)


def test_quantize_and_dequantize_release_the_gil() -> None:
    # Contiguous float32 input: the wrapper makes no numpy copy (which could drop the GIL on
    # its own), so the only place these calls can let the watcher run is the C++ loop.
    rows = np.ascontiguousarray(GAUSS[:16])
    packed = qtypes.quantize("Q4_K", rows)
    assert other_thread_runs_during(lambda: qtypes.quantize("Q4_K", rows))
    assert other_thread_runs_during(lambda: qtypes.dequantize("Q4_K", packed, rows.shape))


# ---- bad input: always QuantError --------------------------------------------------------------


@pytest.mark.parametrize(
    "qtype", [99, -1, 2**40, "Q9_X", "", GGMLType.MXFP4, "i32", 39, 24, True, 2.0, None]
)
def test_unknown_or_unsupported_types_raise(qtype: object) -> None:
    with pytest.raises(QuantError):
        qtypes.type_info(qtype)  # type: ignore[arg-type]
    with pytest.raises(QuantError):
        qtypes.quantize(qtype, np.zeros(256, np.float32))  # type: ignore[arg-type]
    with pytest.raises(QuantError):
        qtypes.dequantize(qtype, np.zeros(144, np.uint8), 256)  # type: ignore[arg-type]


def test_wrong_sizes_raise() -> None:
    q = qtypes.quantize("Q4_K", GAUSS[:2, :512])
    with pytest.raises(QuantError, match="bytes"):
        qtypes.dequantize("Q4_K", q.reshape(-1)[:-1], (2, 512))
    with pytest.raises(QuantError, match="bytes"):
        qtypes.dequantize("Q4_K", q, (2, 768))
    with pytest.raises(QuantError, match="multiple of the block size"):
        qtypes.dequantize("Q4_K", q, (4, 256 + 128, 1)[:2])
    with pytest.raises(QuantError, match="block"):
        qtypes.quantize("Q4_0", np.zeros((2, 33), np.float32))
    with pytest.raises(QuantError):
        qtypes.quantize("Q4_0", np.float32(1.0))
    with pytest.raises(QuantError):
        qtypes.quantize("Q4_0", np.zeros(32, np.complex64))
    with pytest.raises(QuantError):
        qtypes.quantize("Q4_0", np.array(["a"] * 32))
    for shape in [(-1, 32), (2, "32"), 3.5, (2**40, 2**40)]:
        with pytest.raises(QuantError):
            qtypes.dequantize("Q8_0", q, shape)  # type: ignore[arg-type]
    with pytest.raises(QuantError):
        qtypes.dequantize("Q8_0", object(), (32,))
    with pytest.raises(QuantError):
        qtypes.dequantize("Q8_0", np.array([None] * 34, dtype=object), (32,))
    with pytest.raises(QuantError):
        qtypes.dequantize("Q8_0", "x" * 34, (32,))


def test_extension_rechecks_sizes() -> None:
    # The C++ side validates on its own (defence in depth) and raises the same typed error.
    with pytest.raises(QuantError, match="bytes"):
        _core.dequantize(12, b"\0" * 143, 256)
    with pytest.raises(QuantError, match="multiple of the block size"):
        _core.dequantize(12, b"\0" * 144, 255)
    with pytest.raises(QuantError):
        _core.dequantize(12, b"\0" * 144, -256)
    with pytest.raises(QuantError, match="multiple of the block size"):
        _core.quantize(2, np.zeros(40, np.float32))
    with pytest.raises(QuantError, match="float32"):
        _core.quantize(2, np.zeros(32, np.float64))
    with pytest.raises(QuantError, match="contiguous"):
        _core.quantize(2, np.zeros((32, 2), np.float32)[:, 0])
    with pytest.raises(QuantError, match="contiguous"):
        _core.dequantize(8, np.zeros((34, 2), np.uint8)[:, 0], 32)
    with pytest.raises(QuantError, match="unknown"):
        _core.type_traits(39)  # MXFP4: not in pyllm's table
    with pytest.raises(QuantError, match="IQ1_S can only be quantized with an importance"):
        _core.quantize(19, np.zeros(256, np.float32))


def test_readme_quantization_table_is_true() -> None:
    """README's table of types: every weight type once, its bits per weight as the type table
    says, and "writes it" exactly for the bulk types of pyllm quantize's file types."""
    import re

    from pyllm.tools.quantize import FILE_TYPES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\w+) \| ([\d.]+) \| [^|]+ \| ([^|]+) \|$", readme, flags=re.M)
    table = {name: (float(bpw), writes.strip()) for name, bpw, writes in rows}
    assert set(table) == {t.name for t in qtypes.weight_types()}
    written = {ft.bulk.name for ft in FILE_TYPES.values()}
    for name, (bpw, writes) in table.items():
        info = TYPE_INFO[GGMLType[name]]
        assert bpw == 8 * info.type_size / info.block_size, name
        assert writes.startswith("yes") == (name in written), name
