"""Element-wise kernels of csrc/cpu/isa/ops.cc, here SwiGLU and with it the compiler-vectorized
exp it shares with the attention softmax and the sampler (csrc/cpu/fast_exp.h), on every ISA of
this machine."""

from __future__ import annotations

import numpy as np
import pytest

from pyllm.errors import QuantError
from tests.test_kernels import ISAS, core, isa_guard  # noqa: F401  (fixture)


def _silu_times(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = gate.astype(np.float64)
    with np.errstate(over="ignore"):
        return g / (1.0 + np.exp(-g)) * up.astype(np.float64)


def test_swiglu_matches_float64_on_every_isa(isa_guard: None) -> None:  # noqa: F811
    rng = np.random.default_rng(0)
    # ordinary values, the range where exp under/overflows, and a length with a scalar tail
    gate = np.concatenate([rng.standard_normal(1000) * 4, np.linspace(-120, 120, 997)])
    gate = gate.astype(np.float32)
    up = rng.standard_normal(gate.size).astype(np.float32)
    ref = _silu_times(gate, up)
    for isa in ISAS:
        core.set_active_isa(isa)
        out = core.swiglu(gate, up)
        assert np.all(np.isfinite(out)), isa
        # ~2e-7 from exp plus the float32 product and division
        err = np.abs(out - ref) / np.maximum(np.abs(ref), 1e-30)
        small = np.abs(ref) < 1e-30  # silu of very negative gates: zero or a tiny denormal
        assert np.all(err[~small] < 1e-6), f"{isa}: {err[~small].max():.3g}"
        assert np.all(np.abs(out[small]) < 1e-30), isa


def test_swiglu_keeps_nan_and_inf(isa_guard: None) -> None:  # noqa: F811
    gate = np.array([np.nan, np.inf, -np.inf, 0.0] * 8, dtype=np.float32)
    up = np.ones_like(gate)
    for isa in ISAS:
        core.set_active_isa(isa)
        out = core.swiglu(gate, up)
        assert np.all(np.isnan(out[0::4])), isa  # NaN in, NaN out (not hidden by a clamp)
        assert np.all(out[3::4] == 0.0), isa


def test_swiglu_rejects_mismatched_lengths() -> None:
    with pytest.raises(QuantError):
        core.swiglu(np.zeros(3, np.float32), np.zeros(4, np.float32))


def test_swiglu_short_lengths_on_every_isa(isa_guard: None) -> None:  # noqa: F811
    """Lengths 1..40: no whole vector, one vector plus a tail, two plus a tail (8 and 16 lanes);
    every element of each is checked, so a skipped or doubled tail element cannot pass."""
    rng = np.random.default_rng(3)
    for isa in ISAS:
        core.set_active_isa(isa)
        for n in range(1, 41):
            gate = (rng.standard_normal(n) * 4).astype(np.float32)
            up = rng.standard_normal(n).astype(np.float32)
            out = core.swiglu(gate, up)
            assert out.shape == (n,)
            ref = _silu_times(gate, up)
            err = np.abs(out - ref) / np.maximum(np.abs(ref), 1e-30)
            assert err.max() < 1e-6, f"{isa} n={n}: {err.max():.3g}"
            # negative control: the last element left out (as a missing tail loop would)
            broken = out.copy()
            broken[-1] = 0.0
            assert np.abs(broken - ref).max() > 1e-6 or abs(ref[-1]) < 1e-6
