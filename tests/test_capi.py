"""The C ABI (csrc/include/pyllm.h, libpyllm_c.so) driven through cffi, a non-pybind client.

The library and header are installed next to pyllm._core (pyllm/libpyllm_c.so and
pyllm/include/pyllm.h); the header is fed to cffi after stripping the preprocessor lines, so the
test also proves that the installed header is plain C that describes the library.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import cffi
import gguf
import numpy as np
import pytest

from pyllm import _core as core

PKG_DIR = Path(core.__file__).resolve().parent
LIB = PKG_DIR / "libpyllm_c.so"
HEADER = PKG_DIR / "include" / "pyllm.h"


def cdef_from_header(text: str) -> str:
    """The declarations of pyllm.h in the subset of C that cffi's cdef accepts."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"#ifdef __cplusplus.*?#endif", "", text, flags=re.S)  # extern "C" { ... }
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return "\n".join(lines).replace("PYLLM_API", "")


@pytest.fixture(scope="module")
def capi() -> tuple[Any, Any]:
    if not LIB.exists() or not HEADER.exists():
        pytest.fail(f"C ABI not installed next to _core: {LIB} / {HEADER}")
    ffi = cffi.FFI()
    ffi.cdef(cdef_from_header(HEADER.read_text()))
    ffi.cdef("#define PYLLM_OK 0\n#define PYLLM_E_INVALID -1\n#define PYLLM_E_RUNTIME -2")
    lib = ffi.dlopen(str(LIB))
    return ffi, lib


def allowed(wd: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Error bound of matmul (see test_kernels.py): F32 summation plus, for the AVX-512 VNNI
    kernels, half an int16 step per activation block of 32 times the block's sum of |w|."""
    xd = np.abs(x.astype(np.float64))
    amax = xd.reshape(len(xd), -1, 32).max(axis=2)
    wabs = np.abs(wd.astype(np.float64))
    step = (amax / 32767.0 / 2.0) @ wabs.reshape(len(wabs), -1, 32).sum(axis=2).T
    return 1e-5 * (xd @ wabs.T) + step


def ptr(ffi: Any, arr: np.ndarray, ctype: str) -> Any:
    return ffi.cast(ctype, ffi.from_buffer(arr))


def test_version_isa_threads(capi: tuple[Any, Any]) -> None:
    ffi, lib = capi
    assert ffi.string(lib.pyllm_version()).decode() == core.__version__
    isas = ffi.string(lib.pyllm_available_isas()).decode().split(",")
    assert isas[0] == "scalar"
    before = ffi.string(lib.pyllm_active_isa()).decode()
    assert before in isas
    assert lib.pyllm_set_isa(b"scalar") == lib.PYLLM_OK
    assert ffi.string(lib.pyllm_active_isa()) == b"scalar"
    assert lib.pyllm_set_isa(b"no-such-isa") == lib.PYLLM_E_INVALID
    assert b"unknown ISA" in ffi.string(lib.pyllm_last_error())
    assert lib.pyllm_set_isa(before.encode()) == lib.PYLLM_OK
    assert lib.pyllm_set_num_threads(3) == lib.PYLLM_OK
    assert lib.pyllm_get_num_threads() == 3
    assert lib.pyllm_set_num_threads(0) == lib.PYLLM_OK
    assert lib.pyllm_get_num_threads() >= 1


def test_type_info_and_row_size(capi: tuple[Any, Any]) -> None:
    ffi, lib = capi
    info = ffi.new("pyllm_type_info*")
    assert lib.pyllm_type_info_get(12, info) == lib.PYLLM_OK
    assert ffi.string(info.name) == b"Q4_K"
    assert (info.block_size, info.type_size, info.is_quantized, info.matmul_weight) == (
        256,
        144,
        1,
        1,
    )
    assert lib.pyllm_type_info_get(15, info) == lib.PYLLM_OK and info.matmul_weight == 0
    assert lib.pyllm_type_info_get(99, info) == lib.PYLLM_E_INVALID
    assert lib.pyllm_row_size(2, 64) == 36
    assert lib.pyllm_row_size(2, 33) == lib.PYLLM_E_INVALID
    assert lib.pyllm_row_size(99, 32) == lib.PYLLM_E_INVALID


def test_quantize_dequantize_roundtrip_matches_gguf(capi: tuple[Any, Any]) -> None:
    ffi, lib = capi
    rng = np.random.default_rng(3)
    x = rng.standard_normal(256).astype(np.float32)
    for name, type_id in (("Q8_0", 8), ("Q4_0", 2), ("F16", 1)):
        nbytes = lib.pyllm_row_size(type_id, x.size)
        q = np.zeros(nbytes, np.uint8)
        rc = lib.pyllm_quantize(
            type_id, ptr(ffi, x, "float*"), x.size, ptr(ffi, q, "void*"), q.size
        )
        assert rc == lib.PYLLM_OK, ffi.string(lib.pyllm_last_error())
        qtype = gguf.GGMLQuantizationType[name]
        expected = np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8)
        assert np.array_equal(q, expected.reshape(-1))
        y = np.zeros_like(x)
        rc = lib.pyllm_dequantize(type_id, ptr(ffi, q, "void*"), q.size, ptr(ffi, y, "float*"), 256)
        assert rc == lib.PYLLM_OK
        assert np.array_equal(y, gguf.quants.dequantize(q, qtype).reshape(-1))
    # A type pyllm reads but has no quantizer for: an error naming it, nothing written.
    q = np.full(66, 0xAB, np.uint8)  # one IQ2_XXS block
    rc = lib.pyllm_quantize(16, ptr(ffi, x, "float*"), x.size, ptr(ffi, q, "void*"), q.size)
    assert rc == lib.PYLLM_E_INVALID and b"IQ2_XXS" in ffi.string(lib.pyllm_last_error())
    assert (q == 0xAB).all()
    # Wrong sizes are rejected, not read past.
    q = np.zeros(10, np.uint8)
    y = np.zeros(32, np.float32)
    rc = lib.pyllm_dequantize(2, ptr(ffi, q, "void*"), q.size, ptr(ffi, y, "float*"), 32)
    assert rc == lib.PYLLM_E_INVALID and ffi.string(lib.pyllm_last_error())


def test_matmul_and_matvec(capi: tuple[Any, Any]) -> None:
    ffi, lib = capi
    rng = np.random.default_rng(4)
    n_out, k, n_tokens = 19, 64, 9
    wf = rng.standard_normal((n_out, k)).astype(np.float32)
    w = np.asarray(gguf.quants.quantize(wf, gguf.GGMLQuantizationType.Q8_0)).reshape(-1)
    wd = gguf.quants.dequantize(w.reshape(n_out, -1), gguf.GGMLQuantizationType.Q8_0)
    x = rng.standard_normal((n_tokens, k)).astype(np.float32)
    y = np.zeros((n_tokens, n_out), np.float32)
    rc = lib.pyllm_matmul(
        8,
        ptr(ffi, w, "void*"),
        w.size,
        n_out,
        k,
        ptr(ffi, x, "float*"),
        n_tokens,
        ptr(ffi, y, "float*"),
    )
    assert rc == lib.PYLLM_OK, ffi.string(lib.pyllm_last_error())
    ref = x.astype(np.float64) @ wd.astype(np.float64).T
    assert np.all(np.abs(y - ref) <= allowed(wd, x))
    yv = np.zeros(n_out, np.float32)
    rc = lib.pyllm_matvec(
        8,
        ptr(ffi, w, "void*"),
        w.size,
        n_out,
        k,
        ptr(ffi, x[0].copy(), "float*"),
        ptr(ffi, yv, "float*"),
    )
    assert rc == lib.PYLLM_OK
    assert np.all(np.abs(yv - ref[0]) <= allowed(wd, x[:1])[0])
    # w_bytes that does not match n_out rows -> error code and message, no crash.
    rc = lib.pyllm_matmul(
        8,
        ptr(ffi, w, "void*"),
        w.size - 1,
        n_out,
        k,
        ptr(ffi, x, "float*"),
        n_tokens,
        ptr(ffi, y, "float*"),
    )
    assert rc == lib.PYLLM_E_INVALID
    assert b"w_bytes" in ffi.string(lib.pyllm_last_error())
