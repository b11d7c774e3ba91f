"""Speed of the Python quantization entry points (pyllm.formats.qtypes), for the record, not
pass/fail.

Run with ``python -m pytest bench/test_bench_quants.py`` (pytest-benchmark prints the table).
The tensor is a 2048 x 2048 float32 Gaussian matrix (4 Mi elements, 16 MiB): dequantize cases
decode its quantized bytes, quantize cases encode it. Both run the C++ reference routines with the
GIL released, split by blocks over the default thread pool; the gguf package's numpy code is
benchmarked alongside on the same data as a point of comparison.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pyllm.formats import qtypes
from pyllm.formats.gguf.constants import GGMLType

ROWS, COLS = 2048, 2048
TYPES = [GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0,
         GGMLType.Q4_K, GGMLType.Q6_K]  # fmt: skip


@pytest.fixture(scope="module")
def matrix() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((ROWS, COLS)).astype(np.float32)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_bench_dequantize(benchmark: Any, matrix: np.ndarray, t: GGMLType) -> None:
    raw = qtypes.quantize(t, matrix)
    benchmark.extra_info["MB_in"] = raw.nbytes / 1e6
    out = benchmark(qtypes.dequantize, t, raw, matrix.shape)
    assert out.shape == matrix.shape


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_bench_quantize(benchmark: Any, matrix: np.ndarray, t: GGMLType) -> None:
    out = benchmark(qtypes.quantize, t, matrix)
    assert out.shape == qtypes.byte_shape(t, matrix.shape)


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.Q4_K], ids=lambda t: t.name)
def test_bench_gguf_numpy_dequantize(benchmark: Any, matrix: np.ndarray, t: GGMLType) -> None:
    gguf_quants = pytest.importorskip("gguf.quants")
    import gguf

    raw = qtypes.quantize(t, matrix)
    out = benchmark(gguf_quants.dequantize, raw, gguf.GGMLQuantizationType(int(t)))
    assert out.shape == matrix.shape
