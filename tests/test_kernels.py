"""The matmul kernels (pyllm._core.matmul) for every weight type on every ISA of this machine.

Reference: a float64 numpy product of the weights dequantized by the gguf package. Thresholds,
per output element:
  * F32-math kernels (every type and ISA, except below): weights dequantized exactly, activations
    unrounded, F32 accumulation: |y - ref| <= RTOL * sum_i |w_i x_i| with RTOL = 1e-5 (measured
    worst case ~1e-6 at k <= 512).
  * AVX-512 VNNI kernels: matvec (n_tokens < 32, matvec_vnni.cc, matvec_vnni_iq.cc) of every
    block type and matmat (n_tokens >= 32, matmat_vnni.cc, matmat_vnni_iq.cc) of every block
    type except Q2_K; and
    the AVX2 matvec (n_tokens < 16, matvec_avx2.cc) of every block type except the 8-bit ones
    (Q8_0, IQ4_NL, IQ4_XS):
    activations are rounded to int16 steps per block of 32, adding at most half a step per
    element: + sum_b (amax_b / 32767 / 2) * sum_{i in b} |w_i|   (256x finer than ggml's int8).
Each ISA is also compared with the scalar path at twice those bounds.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import gguf
import numpy as np
import pytest

from pyllm import _core as core
from pyllm.errors import QuantError

RTOL = 1e-5
ISAS = list(core.available_isas())

# name -> (ggml id, elements per block, bytes per block, byte offsets of the f16 scale fields)
TYPES: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "F32": (0, 1, 4, ()),
    "F16": (1, 1, 2, (0,)),
    "BF16": (30, 1, 2, ()),
    "Q4_0": (2, 32, 18, (0,)),
    "Q4_1": (3, 32, 20, (0, 2)),
    "Q5_0": (6, 32, 22, (0,)),
    "Q5_1": (7, 32, 24, (0, 2)),
    "Q8_0": (8, 32, 34, (0,)),
    "Q2_K": (10, 256, 84, (80, 82)),
    "Q3_K": (11, 256, 110, (108,)),
    "Q4_K": (12, 256, 144, (0, 2)),
    "Q5_K": (13, 256, 176, (0, 2)),
    "Q6_K": (14, 256, 210, (208,)),
    "IQ4_NL": (20, 32, 18, (0,)),
    "IQ4_XS": (23, 256, 136, (0,)),
    "IQ2_XXS": (16, 256, 66, (0,)),
    "IQ2_XS": (17, 256, 74, (0,)),
    "IQ2_S": (22, 256, 82, (0,)),
    "IQ3_XXS": (18, 256, 98, (0,)),
    "IQ3_S": (21, 256, 110, (0,)),
    "IQ1_S": (19, 256, 50, (0,)),
    "IQ1_M": (29, 256, 56, ()),  # d spread over the scale words: see random_weights
    "TQ1_0": (34, 256, 54, (52,)),
    "TQ2_0": (35, 256, 66, (64,)),
}
IQ1M_SCALE_WORDS = 48  # byte offset of IQ1_M's four uint16 scale words (d in their top nibbles)


def random_weights(name: str, n_out: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw blocks (n_out, row_bytes) whose f16 scales are finite and moderate."""
    _, block, size, halves = TYPES[name]
    if name == "F32":
        return rng.uniform(-1, 1, (n_out, k)).astype(np.float32).view(np.uint8)
    if name == "BF16":
        bits = rng.uniform(-1, 1, (n_out, k)).astype(np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, (n_out * (k // block), size), dtype=np.uint8)
    scale = 1.0 if block == 1 else 0.05
    for off in halves:
        h = (rng.uniform(-1, 1, raw.shape[0]) * scale).astype(np.float16)
        raw[:, off : off + 2] = h.view(np.uint8).reshape(-1, 2)
    if name == "IQ1_M":  # nibble w of the f16 d is the top nibble of scale word w
        d = (rng.uniform(-1, 1, raw.shape[0]) * scale).astype(np.float16).view(np.uint16)
        words = raw[:, IQ1M_SCALE_WORDS : IQ1M_SCALE_WORDS + 8].copy().view(np.uint16)
        for w in range(4):
            words[:, w] = (words[:, w] & 0x0FFF) | (((d >> (4 * w)) & 0xF) << 12)
        raw[:, IQ1M_SCALE_WORDS : IQ1M_SCALE_WORDS + 8] = words.view(np.uint8)
    return raw.reshape(n_out, -1)


def dequantize(name: str, w: np.ndarray) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType[name]
    return np.asarray(gguf.quants.dequantize(w, qtype), dtype=np.float64)


@pytest.fixture()
def isa_guard() -> Iterator[None]:
    before = core.active_isa()
    yield
    core.set_active_isa(before)


# AVX-512 VNNI kernels (see the module doc)
# grid i-quants and ternary types: VNNI decode (matvec_vnni_iq.cc), prefill (matmat_vnni_iq.cc)
GRID_INT16_MATVEC = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "TQ1_0",
                     "TQ2_0"}
INT16_MATVEC = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                "IQ4_NL", "IQ4_XS"} | GRID_INT16_MATVEC
INT16_MATMAT = INT16_MATVEC - {"Q2_K"}
# matvec_avx2.cc
INT16_MATVEC_AVX2 = INT16_MATVEC - {"Q8_0", "IQ4_NL", "IQ4_XS"} - GRID_INT16_MATVEC
# matvec below this many tokens, matmat from it on (csrc/include/pyllm/matmul.h)
MATMAT_MIN_TOKENS = {"scalar": 16, "avx2": 16, "avx512": 32, "neon": 16}


def allowed_error(wd: np.ndarray, x: np.ndarray, int16: bool) -> np.ndarray:
    """Per-output error bound (n_tokens, n_out) for the kernel class (see the module doc)."""
    xd = x.astype(np.float64)
    bound = RTOL * (np.abs(xd) @ np.abs(wd).T)
    if int16:
        n_out, k = wd.shape
        amax = np.abs(xd).reshape(len(xd), k // 32, 32).max(axis=2)
        wabs = np.abs(wd).reshape(n_out, k // 32, 32).sum(axis=2)
        bound += (amax / 32767.0 / 2.0) @ wabs.T
    return bound


def test_grid_and_ternary_types_use_int16_only_for_avx512() -> None:
    """The grid i-quants and ternary types have int16 kernels for AVX-512 decode and prefill
    (F32 math on the other ISAs)."""
    new = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0"}
    assert new <= set(TYPES)
    assert new == GRID_INT16_MATVEC
    assert new <= INT16_MATMAT and not new & INT16_MATVEC_AVX2


def uses_int16(name: str, isa: str, n_tokens: int) -> bool:
    if isa == "avx2":
        return n_tokens < MATMAT_MIN_TOKENS[isa] and name in INT16_MATVEC_AVX2
    if isa != "avx512":
        return False
    return name in (INT16_MATVEC if n_tokens < MATMAT_MIN_TOKENS[isa] else INT16_MATMAT)


def check_close(
    y: np.ndarray, wd: np.ndarray, x: np.ndarray, what: str, int16: bool = False
) -> None:
    ref = x.astype(np.float64) @ wd.T
    ratio = np.abs(y.astype(np.float64) - ref) / np.maximum(allowed_error(wd, x, int16), 1e-30)
    assert np.all(np.isfinite(y)), what
    assert ratio.max() <= 1.0, f"{what}: error {ratio.max():.3g} x the allowed bound"


@pytest.mark.parametrize("name", list(TYPES))
def test_matmul_every_isa_matches_float64(name: str, isa_guard: None) -> None:
    _, block, _, _ = TYPES[name]
    # 75: k not a multiple of any vector width; 224 = 7 blocks: a group of 4 + 3 tail blocks
    k = {1: 75, 32: 224, 256: 512}[block]
    n_out = 37  # not a multiple of the thread count, the panel height or 4
    rng = np.random.default_rng(TYPES[name][0])
    w = random_weights(name, n_out, k, rng)
    wd = dequantize(name, w)
    assert wd.shape == (n_out, k)
    for n_tokens in (1, 2, 7, 13, 16, 40, 512):
        x = rng.standard_normal((n_tokens, k)).astype(np.float32)
        results = {}
        for isa in ISAS:
            core.set_active_isa(isa)
            y = core.matmul(TYPES[name][0], w, n_out, k, x)
            assert y.shape == (n_tokens, n_out) and y.dtype == np.float32
            int16 = uses_int16(name, isa, n_tokens)
            check_close(y, wd, x, f"{name} isa={isa} n_tokens={n_tokens}", int16)
            results[isa] = y
        for isa, y in results.items():  # every ISA against the scalar reference path
            diff = np.abs(y.astype(np.float64) - results["scalar"])
            bound = 2 * allowed_error(wd, x, uses_int16(name, isa, n_tokens))
            assert np.all(diff <= bound), f"{name} {isa} vs scalar n_tokens={n_tokens}"


def test_matvec_1d_and_thread_counts(isa_guard: None) -> None:
    rng = np.random.default_rng(5)
    w = random_weights("Q4_K", 45, 256, rng)
    wd = dequantize("Q4_K", w)
    x = rng.standard_normal(256).astype(np.float32)
    before = core.get_num_threads()
    try:
        for threads in (1, 3, 4):
            core.set_num_threads(threads)
            assert core.get_num_threads() == threads
            y = core.matmul(12, w, 45, 256, x)
            assert y.shape == (45,)
            int16 = uses_int16("Q4_K", core.active_isa(), 1)
            check_close(y[None, :], wd, x[None, :], f"threads={threads}", int16)
    finally:
        core.set_num_threads(before)


def test_real_model_tensors(smollm2_path, isa_guard: None) -> None:  # type: ignore[no-untyped-def]
    """A real Q4_1 and the Q8_0 embedding of SmolLM2 against gguf's dequantizer."""
    reader = gguf.GGUFReader(str(smollm2_path))
    by_name = {t.name: t for t in reader.tensors}
    rng = np.random.default_rng(0)
    for name, rows in (("blk.0.attn_q.weight", None), ("token_embd.weight", 300)):
        t = by_name[name]
        raw = np.asarray(t.data)
        if rows is not None:
            raw = raw[:rows]
        qname = gguf.GGMLQuantizationType(t.tensor_type).name
        wd = dequantize(qname, raw)
        n_out, k = wd.shape
        x = rng.standard_normal((3, k)).astype(np.float32)
        for isa in ISAS:
            core.set_active_isa(isa)
            y = core.matmul(int(t.tensor_type), np.ascontiguousarray(raw), n_out, k, x)
            check_close(y, wd, x, f"{name} {qname} isa={isa}", uses_int16(qname, isa, 3))


@pytest.mark.parametrize(
    ("qtype", "n_out", "k", "w_bytes", "x_shape", "x_dtype"),
    [
        (99, 1, 32, 18, (1, 32), np.float32),  # unknown type id
        (15, 1, 256, 292, (1, 256), np.float32),  # Q8_K: activation-only type
        (2, 1, 33, 18, (1, 33), np.float32),  # k not a multiple of the block
        (12, 1, 32, 144, (1, 32), np.float32),  # k not a multiple of 256
        (2, 2, 32, 18, (1, 32), np.float32),  # weights too short for n_out rows
        (2, 1, 32, 18, (1, 64), np.float32),  # activations of the wrong width
        (2, 1, 32, 18, (1, 2, 32), np.float32),  # 3-D activations
        (2, 1, 32, 18, (1, 32), np.float64),  # wrong activation dtype
        (2, -1, 32, 18, (1, 32), np.float32),  # negative size
    ],
)
def test_bad_input_raises_quant_error(
    qtype: int, n_out: int, k: int, w_bytes: int, x_shape: tuple[int, ...], x_dtype: type
) -> None:
    w = np.zeros(w_bytes, dtype=np.uint8)
    x = np.zeros(x_shape, dtype=x_dtype)
    with pytest.raises(QuantError):
        core.matmul(qtype, w, n_out, k, x)


def test_wrong_weight_dtype_raises() -> None:
    with pytest.raises(QuantError):
        core.matmul(0, np.zeros(4, dtype=np.float32), 1, 4, np.zeros((1, 4), np.float32))


def test_empty_problems() -> None:
    w = np.zeros((0, 18), dtype=np.uint8)
    assert core.matmul(2, w, 0, 32, np.zeros((3, 32), np.float32)).shape == (3, 0)
    y = core.matmul(0, np.zeros(0, np.uint8), 4, 0, np.zeros((2, 0), np.float32))
    assert y.shape == (2, 4) and not y.any()


def test_misaligned_weights_are_accepted() -> None:
    rng = np.random.default_rng(9)
    w = random_weights("Q4_0", 6, 64, rng).reshape(-1)
    buf = np.zeros(w.size + 1, dtype=np.uint8)
    odd = buf[1:]  # C-contiguous but at an odd address
    odd[:] = w
    x = rng.standard_normal((3, 64)).astype(np.float32)
    assert np.array_equal(core.matmul(2, odd, 6, 64, x), core.matmul(2, w, 6, 64, x))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_gets_a_working_pool() -> None:
    """After fork() the inherited pool has no workers; the child must not deadlock."""
    rng = np.random.default_rng(10)
    w = random_weights("Q8_0", 64, 256, rng)
    x = rng.standard_normal((16, 256)).astype(np.float32)
    expected = core.matmul(8, w, 64, 256, x)  # creates the default pool in the parent
    pid = os.fork()
    if pid == 0:  # child: a hang is turned into a failure by SIGALRM
        signal.alarm(30)
        ok = np.array_equal(core.matmul(8, w, 64, 256, x), expected)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_absurd_thread_count_is_rejected() -> None:
    before = core.get_num_threads()
    with pytest.raises(ValueError):
        core.set_num_threads(10**6)
    assert core.get_num_threads() == before
