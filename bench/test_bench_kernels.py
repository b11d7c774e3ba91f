"""Speed of the matmul kernels through the Python binding, for the record, not pass/fail.

Run with ``python -m pytest bench/test_bench_kernels.py`` (pytest-benchmark prints the table).
The weights are a 5632 x 2048 matrix (TinyLlama's FFN shape) quantized by pyllm.formats.qtypes; the
matvec case is one token (decode), the matmat case 512 tokens (prefill). Each runs the kernels of
the active ISA on the default thread pool with the GIL released; extra_info records the weight
GB/s (matvec) and GOP/s (matmat, 2 ops per multiply-add). The C-level numbers without the
binding are in bench/bench_kernels.cc.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pyllm import _core as core
from pyllm.formats import qtypes
from pyllm.formats.gguf.constants import GGMLType

N_OUT, K = 5632, 2048
TYPES = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.F16]


@pytest.fixture(scope="module")
def matrix() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((N_OUT, K)).astype(np.float32)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_bench_matvec(benchmark: Any, matrix: np.ndarray, t: GGMLType) -> None:
    w = qtypes.quantize(t, matrix)
    x = np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)
    y = benchmark(core.matmul, int(t), w, N_OUT, K, x)
    benchmark.extra_info["GB/s"] = w.nbytes / benchmark.stats.stats.median / 1e9
    assert y.shape == (1, N_OUT)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_bench_matmat_512(benchmark: Any, matrix: np.ndarray, t: GGMLType) -> None:
    w = qtypes.quantize(t, matrix)
    x = np.random.default_rng(2).standard_normal((512, K)).astype(np.float32)
    y = benchmark.pedantic(core.matmul, args=(int(t), w, N_OUT, K, x), rounds=5, warmup_rounds=1)
    benchmark.extra_info["GOP/s"] = 2.0 * N_OUT * K * 512 / benchmark.stats.stats.median / 1e9
    assert y.shape == (512, N_OUT)
