"""The i-quant types (csrc/quant/iquants.cc): dequantization bit-exact with the gguf package's
numpy code, on random blocks and on blocks that hold every code of every table; quantization
byte-identical to llama.cpp's."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from pyllm.formats import qtypes
from pyllm.formats.gguf import GGMLType
from pyllm.formats.gguf.constants import TYPE_INFO

IQUANTS = ["IQ4_NL", "IQ4_XS"]
# the types pyllm quantizes with an importance matrix, byte-identical to llama.cpp
IMATRIX_IQUANTS = ["IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S",
                   "IQ1_M", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# the types whose quantizer matches llama.cpp's without an importance matrix too (figures)
PLAIN_QUANTS = ["IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_S", "IQ1_M"]
# the grid types whose figures include iquant_edge_inputs (IQ3_S not: its all-zero sub-blocks)
EDGE_IQUANTS = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ1_S", "IQ1_M"]
# llama.cpp's IQ3_S quantizer misplaces the codes after an all-zero sub-block (pyllm does not,
# tests/test_iquants_grid.py): its figures are of the inputs without their first row (which has)
ZERO_SUBBLOCK_DIFFERS = {"IQ3_S"}


def figure_input(name: str, x: np.ndarray) -> np.ndarray:
    return x[1:] if name in ZERO_SUBBLOCK_DIFFERS else x
# their relative importance-weighted error on iquant_inputs' Gaussian rows: ~5-10 % above the
# measured worst of the three inputs (IQ4_NL 0.076, IQ4_XS 0.078, IQ2_XXS 0.422, IQ2_XS 0.337,
# IQ2_S 0.311, IQ3_XXS 0.222, IQ3_S 0.170, IQ1_S 0.504, IQ1_M 0.423, Q4_0 0.084, Q4_1 0.065,
# Q5_0 0.050, Q5_1 0.033, Q2_K 0.232, Q3_K 0.130, Q4_K 0.067, Q5_K 0.036, Q6_K 0.022)
IMATRIX_REL_BOUND = {"IQ4_NL": 0.082, "IQ4_XS": 0.082, "IQ2_XXS": 0.44, "IQ2_XS": 0.36,
                     "IQ2_S": 0.325, "IQ3_XXS": 0.235, "IQ3_S": 0.18, "IQ1_S": 0.525,
                     "IQ1_M": 0.44, "Q4_0": 0.09, "Q4_1": 0.07, "Q5_0": 0.053,
                     "Q5_1": 0.035, "Q2_K": 0.25, "Q3_K": 0.14, "Q4_K": 0.071, "Q5_K": 0.038,
                     "Q6_K": 0.023}
# the same without an importance matrix (relative RMS error; measured worst: IQ4_NL / IQ4_XS
# 0.086-0.090, IQ3_S 0.208, IQ3_XXS 0.247, IQ2_S 0.375, IQ1_M 0.589: weights x^2 leave its
# small values to chance)
PLAIN_REL_BOUND = {"IQ4_NL": 0.095, "IQ4_XS": 0.095, "IQ3_S": 0.22, "IQ3_XXS": 0.26,
                   "IQ2_S": 0.39, "IQ1_M": 0.61}
IQUANT_FIGURES = Path(__file__).parent / "data" / "llamacpp_iquant_figures.json"


def _their(t: GGMLType, raw: np.ndarray) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(t))),
                      dtype=np.float32).reshape(-1)


def _ours(t: GGMLType, raw: np.ndarray) -> np.ndarray:
    n = raw.shape[0] * TYPE_INFO[t].block_size
    return qtypes.dequantize(t, raw.reshape(-1), (n,)).reshape(-1)


def _blocks(t: GGMLType, n: int, seed: int) -> np.ndarray:
    """n random blocks with a finite f16 scale d in the first two bytes."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, TYPE_INFO[t].type_size), dtype=np.uint8)
    d = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 2, n)).astype(np.float16)
    raw[:, :2] = d.view(np.uint8).reshape(n, 2)
    return raw


@pytest.mark.parametrize("name", IQUANTS)
def test_random_blocks_are_bit_exact(name: str) -> None:
    t = GGMLType[name]
    raw = _blocks(t, 512, 1)
    want, got = _their(t, raw), _ours(t, raw)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.count_nonzero(got) > 0.9 * got.size  # not trivially zero


@pytest.mark.parametrize("name", IQUANTS)
def test_every_code_and_scale(name: str) -> None:
    """Every 4-bit code in both nibbles, and (IQ4_XS) every 6-bit sub-block scale, with d = 1:
    the values are the table's levels times (ls - 32) exactly."""
    t = GGMLType[name]
    size = TYPE_INFO[t].type_size
    blocks = []
    for lo in range(16):
        for scale in (range(64) if name == "IQ4_XS" else [0]):
            b = np.zeros(size, np.uint8)
            b[:2] = np.array([1.0], np.float16).view(np.uint8)
            if name == "IQ4_XS":  # the same scale in all 8 sub-blocks
                b[2:4] = np.array([sum((scale >> 4) << (2 * j) for j in range(8))],
                                  np.uint16).view(np.uint8)
                b[4:8] = (scale & 15) | ((scale & 15) << 4)
            codes = np.arange(size - (8 if name == "IQ4_XS" else 2)) % 16
            b[-len(codes):] = ((codes + lo) % 16) | (((codes * 7 + lo) % 16) << 4)
            blocks.append(b)
    raw = np.stack(blocks)
    want, got = _their(t, raw), _ours(t, raw)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    levels = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113}
    scales = range(-32, 32) if name == "IQ4_XS" else [1]
    assert set(np.unique(got).astype(int)) == {v * s for v in levels for s in scales}


def iquant_inputs() -> dict[str, np.ndarray]:
    """The inputs of tests/data/make_llamacpp_iquant_figures.py (deterministic): Gaussian rows
    at three magnitudes, with all-zero and one-spike sub-blocks."""
    out = {}
    for i, scale in enumerate((1.0, 1e-3, 50.0)):
        x = (np.random.default_rng(10 + i).standard_normal((8, 1024)) * scale).astype(np.float32)
        x[0, :64] = 0.0
        x[1, 100] = 40.0 * scale
        out[f"gauss{scale:g}"] = x
    return out


def iquant_importance() -> np.ndarray:
    """A deterministic importance per column of iquant_inputs' rows: log-normal over two orders
    of magnitude, as real importance matrices spread."""
    return np.random.default_rng(99).lognormal(0.0, 1.2, 1024).astype(np.float32)


def iquant_edge_inputs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Inputs at the edges of the grid searches (deterministic), each with its importance: an
    all-zero row and a row with one value, a huge value among small ones, only negative or only
    positive values, few distinct values (ties in the IQ1 sorts), a constant row, importance 0
    over whole sub-blocks, values near the all-zero thresholds, one super-block and eight."""
    rng = np.random.default_rng(5)

    def imp(k: int) -> np.ndarray:
        return rng.lognormal(0.0, 1.0, k).astype(np.float32)

    out = {}
    x = np.zeros((2, 512), np.float32)
    x[1, 7] = 3.0
    out["zero+one"] = (x, imp(512))
    x = rng.standard_normal((2, 512)).astype(np.float32)
    x[0, 33], x[1, 300] = 2e4, -5e3  # 4 orders above the rest (f16 scales end at 65504)
    out["huge"] = (x, imp(512))
    out["negative"] = (-np.abs(rng.standard_normal((2, 512))).astype(np.float32), imp(512))
    out["positive"] = (np.abs(rng.standard_normal((2, 512))).astype(np.float32), imp(512))
    out["ties"] = (rng.integers(-2, 3, (2, 512)).astype(np.float32), imp(512))
    x = np.full((1, 512), 0.5, np.float32)
    x[0, 256:] = -0.25
    out["constant"] = (x, np.ones(512, np.float32))
    x, w = rng.standard_normal((2, 512)).astype(np.float32), imp(512)
    w[:40] = w[300:340] = 0.0
    out["zero-importance"] = (x, w)
    out["tiny"] = ((rng.standard_normal((2, 512)) * 1e-9).astype(np.float32), imp(512))
    out["one-block"] = (rng.standard_normal((3, 256)).astype(np.float32), imp(256))
    out["wide"] = (rng.standard_normal((2, 2048)).astype(np.float32), imp(2048))
    return out


@pytest.mark.parametrize("name", IMATRIX_IQUANTS)
def test_importance_guided_quantizer_writes_llama_cpps_bytes(name: str) -> None:
    """With an importance matrix (quantize(..., importance=); llama-quantize --imatrix):
    byte-identical with ggml_quantize_chunk given the same importance (SHA-256 figures), and
    the importance-weighted error is what the guidance lowers."""
    figures = json.loads(IQUANT_FIGURES.read_text(encoding="utf-8"))[f"{name}+imatrix"]
    w = iquant_importance()
    for key, x in iquant_inputs().items():
        x = figure_input(name, x)
        q = np.ascontiguousarray(qtypes.quantize(name, x, importance=w))
        assert hashlib.sha256(q.tobytes()).hexdigest() == figures[key], key
        back = qtypes.dequantize(name, q, x.shape)
        assert np.isfinite(back).all()
        rel = np.sqrt(np.sum(w * (back - x) ** 2) / np.sum(w * x**2))
        assert rel < IMATRIX_REL_BOUND[name], (key, rel)


@pytest.mark.parametrize("name", PLAIN_QUANTS)
def test_quantizer_writes_llama_cpps_bytes(name: str) -> None:
    """pyllm's IQ4_NL / IQ4_XS / IQ3_XXS / IQ3_S quantizer writes exactly the bytes of llama.cpp's
    (ggml_quantize_chunk without an importance matrix, what llama-quantize does then):
    SHA-256 of its output on the same inputs, recorded by the script in tests/data."""
    figures = json.loads(IQUANT_FIGURES.read_text(encoding="utf-8"))
    for key, x in iquant_inputs().items():
        x = figure_input(name, x)
        q = np.ascontiguousarray(qtypes.quantize(name, x))
        assert hashlib.sha256(q.tobytes()).hexdigest() == figures[name][key], key
        back = qtypes.dequantize(name, q, x.shape)
        rel = np.sqrt(np.mean((back - x) ** 2)) / np.sqrt(np.mean(x**2))
        assert rel < PLAIN_REL_BOUND[name], (key, rel)


@pytest.mark.parametrize("name", EDGE_IQUANTS)
def test_grid_quantizers_match_llama_cpp_at_the_edges(name: str) -> None:
    """The grid quantizers on iquant_edge_inputs (with their importance, and without for the
    types llama.cpp quantizes without one): byte-identical with ggml_quantize_chunk (SHA-256
    figures, key "edge:<input>"), finite when dequantized, all-zero rows staying zero."""
    figures = json.loads(IQUANT_FIGURES.read_text(encoding="utf-8"))
    modes = [(f"{name}+imatrix", True)] + ([(name, False)] if name in PLAIN_QUANTS else [])
    for label, guided in modes:
        for key, (x, w) in iquant_edge_inputs().items():
            q = np.ascontiguousarray(qtypes.quantize(name, x, importance=w if guided else None))
            assert hashlib.sha256(q.tobytes()).hexdigest() == figures[label][f"edge:{key}"], \
                (label, key)
            back = qtypes.dequantize(name, q, x.shape)
            assert np.isfinite(back).all()
            if key == "zero+one":
                assert not back[0].any()

