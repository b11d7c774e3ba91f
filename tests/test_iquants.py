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


@pytest.mark.parametrize("name", IQUANTS)
def test_quantizer_writes_llama_cpps_bytes(name: str) -> None:
    """pyllm's IQ4_NL / IQ4_XS quantizer writes exactly the bytes of llama.cpp's
    (ggml_quantize_chunk without an importance matrix, what llama-quantize does then):
    SHA-256 of its output on the same inputs, recorded by the script in tests/data."""
    figures = json.loads(IQUANT_FIGURES.read_text(encoding="utf-8"))
    for key, x in iquant_inputs().items():
        q = np.ascontiguousarray(qtypes.quantize(name, x))
        assert hashlib.sha256(q.tobytes()).hexdigest() == figures[name][key], key
        back = qtypes.dequantize(name, q, x.shape)
        rel = np.sqrt(np.mean((back - x) ** 2)) / np.sqrt(np.mean(x**2))
        assert rel < 0.095, (key, rel)  # 4-bit levels: measured 0.086-0.090
