"""The rows16 weight layout (csrc/include/pyllm/repack.h) and the kernels that read it.

The model repacks its Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K / IQ4_NL / IQ4_XS matrices into
16-row interleaved groups at load when the CPU has the AVX-512 VNNI rows16 kernels; every other
path unpacks groups
back to GGUF rows. The layout must be a lossless permutation, and every ISA and token count must
meet the same float64 error bounds as the GGUF-layout kernels (tests/test_kernels.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pyllm.errors import QuantError
from pyllm.formats.gguf import GGMLType
from pyllm.runtime.llm import LLM
from tests.test_kernels import (
    ISAS,
    TYPES,
    check_close,
    core,
    dequantize,
    isa_guard,  # noqa: F401  (fixture)
    random_weights,
    uses_int16,
)
from tests.tiny_models import TinySpec, write_tiny

REPACKED = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]


def _has_rows16_kernels() -> bool:
    # the model repacks for the active ISA (PYLLM_FORCE_ISA=scalar runs keep the GGUF layout)
    return core.active_isa() == "avx512"


@pytest.mark.parametrize("name", REPACKED)
def test_layout_is_a_lossless_permutation(name: str) -> None:
    qtype, block, size, _ = TYPES[name]
    rng = np.random.default_rng(qtype)
    for n_out, k in ((16, block * 2), (48, 512)):
        w = random_weights(name, n_out, k, rng).reshape(-1)
        packed, back = core.repack_roundtrip(qtype, w, n_out, k)
        assert np.array_equal(back, w)
        assert not np.array_equal(packed[: w.size], w)  # it really moved bytes
        # Q4_0 / Q4_1 / Q8_0 / Q6_K / IQ4_NL keep their size; Q4_K, Q5_K and IQ4_XS store
        # their 6-bit scales unpacked (+4, +4, +2 bytes per block: +2.8 %, +2.3 %, +1.5 %).
        block, extra = {"Q4_K": (144, 4), "Q5_K": (176, 4), "IQ4_XS": (136, 2)}.get(name, (0, 0))
        expected = w.size if block == 0 else w.size // block * (block + extra)
        assert packed.size == expected


def test_q4_0_group_block_is_as_documented() -> None:
    rng = np.random.default_rng(1)
    w = random_weights("Q4_0", 16, 64, rng)  # 16 rows x 2 blocks of 18 bytes
    packed, _ = core.repack_roundtrip(2, w.reshape(-1), 16, 64)
    blocks = w.reshape(16, 2, 18)
    for b in range(2):
        gb = packed[288 * b : 288 * (b + 1)]
        assert np.array_equal(gb[:32].reshape(16, 2), blocks[:, b, :2])  # the 16 scales
        body = gb[32:].reshape(4, 16, 4)  # chunk, row, byte
        assert np.array_equal(body.transpose(1, 0, 2).reshape(16, 16), blocks[:, b, 2:])


@pytest.mark.parametrize("name", REPACKED)
def test_rows16_matmul_every_isa_matches_float64(name: str, isa_guard: None) -> None:  # noqa: F811
    qtype, block, _, _ = TYPES[name]
    k = 512 if block == 256 else 224
    n_out = 48  # three groups: more groups than threads, and not a multiple of 32
    rng = np.random.default_rng(100 + qtype)
    w = random_weights(name, n_out, k, rng).reshape(-1)
    wd = dequantize(name, w.reshape(n_out, -1))
    for n_tokens in (1, 2, 3, 4, 5, 7, 13, 40):
        x = rng.standard_normal((n_tokens, k)).astype(np.float32)
        for isa in ISAS:
            core.set_active_isa(isa)
            y = core.matmul(qtype, w, n_out, k, x, rows16=True)
            plain = core.matmul(qtype, w, n_out, k, x)
            # the rows16 decode kernels round activations like the int16 VNNI matvec kernels
            int16 = uses_int16(name, isa, n_tokens)
            what = f"{name} rows16 isa={isa} n_tokens={n_tokens}"
            check_close(y, wd, x, what, int16)
            check_close(plain, wd, x, what + " (gguf layout)", int16)


def test_rows16_thread_counts_and_uneven_splits(isa_guard: None) -> None:  # noqa: F811
    rng = np.random.default_rng(7)
    n_out, k = 80, 256  # 5 groups over 1..4 threads
    w = random_weights("Q4_K", n_out, k, rng).reshape(-1)
    wd = dequantize("Q4_K", w.reshape(n_out, -1))
    x = rng.standard_normal((1, k)).astype(np.float32)
    before = core.get_num_threads()
    try:
        for threads in (1, 2, 3, 4):
            core.set_num_threads(threads)
            y = core.matmul(12, w, n_out, k, x, rows16=True)
            check_close(y, wd, x, f"threads={threads}", uses_int16("Q4_K", core.active_isa(), 1))
    finally:
        core.set_num_threads(before)


@pytest.mark.parametrize(
    ("qtype", "n_out", "k", "w_bytes"),
    [
        (6, 16, 32, 16 * 22),  # Q5_0 has no rows16 layout
        (2, 17, 32, 17 * 18),  # n_out not a multiple of 16
        (2, 8, 32, 8 * 18),  # fewer rows than a group
    ],
)
def test_rows16_bad_input_raises(qtype: int, n_out: int, k: int, w_bytes: int) -> None:
    w = np.zeros(w_bytes, dtype=np.uint8)
    x = np.zeros((1, k), dtype=np.float32)
    with pytest.raises(QuantError):
        core.matmul(qtype, w, n_out, k, x, rows16=True)
    with pytest.raises(QuantError):
        core.repack_roundtrip(qtype, w, n_out, k)


@pytest.mark.parametrize(
    ("wtype", "tied"),
    [
        (GGMLType.Q4_0, False),
        (GGMLType.Q4_1, True),  # tied output: its rows16 copy, lookups from the GGUF rows
        (GGMLType.Q8_0, False),
        (GGMLType.Q8_0, True),
        (GGMLType.Q4_K, False),
        (GGMLType.Q5_K, False),
        (GGMLType.Q6_K, True),
        (GGMLType.IQ4_NL, False),
        (GGMLType.IQ4_XS, True),
    ],
)
def test_model_repacks_and_gives_the_same_logits(
    tmp_path: Path, wtype: GGMLType, tied: bool
) -> None:
    # 256-wide rows for the k-quants; every matrix has a multiple of 16 rows
    spec = TinySpec(n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=272, wtype=wtype,
                    tied=tied, seed=3)
    path = write_tiny(tmp_path / "m.gguf", spec)
    tokens = list(np.random.default_rng(0).integers(0, spec.n_vocab, 40))
    out = {}
    for repack in (False, True):
        with LLM(path, n_ctx=64, n_threads=2, repack=repack) as llm:
            repacked = llm._model.repacked_bytes
            if repack and _has_rows16_kernels():
                assert repacked > 0
            else:
                assert repacked == 0
            prefill = llm.logits(tokens)  # 40 tokens: matmat, the unpacking path when repacked
            llm.reset()
            decode = np.stack([llm.eval([t]) for t in tokens[:6]])  # the rows16 kernels
            out[repack] = (prefill, decode)
    scale = np.abs(out[False][0]).max()
    # prefill reads the same bytes through the same kernel: identical
    np.testing.assert_array_equal(out[True][0], out[False][0])
    # decode sums the same exact integer block products in another order: each matmul differs
    # by F32 rounding (~1e-7 relative), which a random-weight model amplifies ~100x
    assert np.abs(out[True][1] - out[False][1]).max() <= 1e-3 * scale
    assert np.abs(out[True][1] - out[False][0][:6]).max() <= 1e-3 * scale
