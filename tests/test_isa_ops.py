"""The forward-pass operators of csrc/cpu/isa/ops.cc (rms_norm, rope, attention, to_f16, add)
on every ISA of this machine, against the numpy reference forward (tests/reference/llama_ref.py).

Only matmul and swiglu are bound to Python, so the other operators are observed through the KV
cache, which ``LLM.save_state()`` hands out as raw bytes (header of 5 int32, then per layer the
K rows and the V rows of every position):
  * layer-0 V = rms_norm(embedding) * attn_norm @ Wv:              rms_norm (+ the F32 matmul);
  * layer-0 K = rope(rms_norm(embedding) * attn_norm @ Wk):         rope;
  * layer-0 K and V of an F16 cache = to_f16 of those of an F32 cache, bit for bit;
  * layer-1 K and the logits, which depend on the layer-0 attention, swiglu and add.
The ISA is switched in process with ``_core.set_active_isa`` (the forward looks the op table up
on every call). The shapes are chosen so that no vector loop runs without a tail: n_embd 68 and
n_ff 100 (not multiples of 8 or 16), head_dim 20 and 40 (off the AVX-512 attention's 16-key
tile width) next to 32 (on it: the tiled kernel), GQA groups wider than the 8-row attention
block, partial NeoX rotation, and 37 positions (two 16-key tiles and a tail).

Tolerances: every error below is relative to the largest magnitude of the compared array; the
bounds are about 5x the worst value measured over all ISAs, models, thread counts and prompt or
decode here (in brackets): rms_norm 2e-6 [3.1e-7], rope 2e-6 [4.0e-7], layer-1 K 8e-6 [1.6e-6],
logits 1.5e-5 [3.1e-6; over a lossy cache 2.4e-6; one ISA against scalar 1.8e-6]: the F32
rounding of float32 dot products of length <= 100, against float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from pyllm import _core as core
from pyllm.formats.gguf import GGUFReader, GGUFWriter
from pyllm.runtime.llm import LLM
from tests.reference import llama_ref
from tests.reference.llama_ref import LlamaRef
from tests.tiny_models import TinySpec, write_tiny

ISAS = list(core.available_isas())
RTOL_RMS_NORM = 2e-6
RTOL_ROPE = 2e-6
RTOL_LAYER1_K = 8e-6
RTOL_LOGITS = 1.5e-5

SPECS = {
    # nothing a multiple of a vector width; one KV head for three query heads
    "odd": TinySpec(n_embd=68, n_head=3, n_head_kv=1, head_dim=20, n_ff=100),
    # NeoX pairs (i, i + n_rot/2) over 12 of 20 dims, biases
    "neox_partial": TinySpec(arch="qwen2", n_embd=68, n_head=4, n_head_kv=2, head_dim=20,
                             n_rot=12, n_ff=100, biases=True),
    # 12 query heads per KV head: more than one 8-row attention block per token
    "wide_group": TinySpec(n_embd=72, n_head=12, n_head_kv=1, head_dim=40, n_ff=100),
    # head_dim 32: the AVX-512 16-key tiled attention; Q8_0 caches need whole 32-blocks
    "tiled": TinySpec(n_embd=72, n_head=4, n_head_kv=2, head_dim=32, n_ff=100),
}
TOKENS = [int(t) for t in np.random.default_rng(1).integers(0, 160, 37)]
KV_ENUM = {"f32": 0, "f16": 1, "q8_0": 8}  # the ggml type id save_state writes in its header


@dataclass
class Cache:
    """The KV cache of one context: per layer K and V as float64 (T, n_head_kv, head_dim)."""

    k: list[np.ndarray]
    v: list[np.ndarray]
    raw_k: list[np.ndarray]  # the stored bytes, (T, kv_row_bytes) uint8
    raw_v: list[np.ndarray]


def parse_state(kv: bytes, spec: TinySpec, kv_type: str) -> Cache:
    b = np.frombuffer(kv, dtype=np.uint8)
    magic, n_past, n_layer, kv_dim, kv_enum = b[:20].view(np.int32)
    hd = spec.head_dim or spec.n_embd // spec.n_head
    assert (magic, n_layer, kv_dim, kv_enum) == (0x504C4C4D, spec.n_layer, spec.n_head_kv * hd,
                                                 KV_ENUM[kv_type])
    row_bytes = {"f32": 4 * kv_dim, "f16": 2 * kv_dim, "q8_0": kv_dim // 32 * 34}[kv_type]
    per_layer = n_past * row_bytes
    assert b.size == 20 + 2 * n_layer * per_layer
    cache = Cache([], [], [], [])
    for layer in range(n_layer):
        off = 20 + 2 * layer * per_layer
        for raw, dst, dst_raw in ((b[off:off + per_layer], cache.k, cache.raw_k),
                                  (b[off + per_layer:off + 2 * per_layer], cache.v, cache.raw_v)):
            rows = raw.reshape(n_past, row_bytes)
            dst_raw.append(rows)
            dst.append(_decode_rows(rows, kv_type).reshape(n_past, spec.n_head_kv, hd))
    return cache


def _decode_rows(rows: np.ndarray, kv_type: str) -> np.ndarray:
    if kv_type == "f32":
        return rows.view(np.float32).astype(np.float64)
    if kv_type == "f16":
        return rows.view(np.float16).astype(np.float64)
    # Q8_0 dequantized by the gguf package, not by our code
    return np.asarray(gguf.quants.dequantize(rows, gguf.GGMLQuantizationType.Q8_0), np.float64)


@contextmanager
def active_isa(isa: str) -> Iterator[None]:
    before = core.active_isa()
    core.set_active_isa(isa)
    try:
        yield
    finally:
        core.set_active_isa(before)


def run(path: Path, spec: TinySpec, isa: str, kv_type: str = "f32", n_threads: int = 1,
        decode: bool = False) -> tuple[np.ndarray, Cache]:
    """(logits (T, V), KV cache) of TOKENS on one ISA, in one batch or one token at a time."""
    with active_isa(isa), LLM(path, n_ctx=64, n_threads=n_threads, kv_type=kv_type) as llm:
        assert core.active_isa() == isa
        logits = np.stack([llm.eval([t]) for t in TOKENS]) if decode else llm.logits(TOKENS)
        return logits, parse_state(llm.save_state().kv, spec, kv_type)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@dataclass
class Model:
    spec: TinySpec
    path: Path
    ref: LlamaRef
    trace: dict[str, np.ndarray]
    logits: np.ndarray  # reference logits (T, V)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Model]:
    out = {}
    folder = tmp_path_factory.mktemp("isa_ops")
    for name, spec in SPECS.items():
        path = write_tiny(folder / f"{name}.gguf", spec)
        ref = LlamaRef(str(path))
        trace: dict[str, np.ndarray] = {}
        logits = ref.forward(TOKENS, trace=trace)
        out[name] = Model(spec, path, ref, trace, logits)
    return out


def layer0_v(m: Model, norm: Callable[[np.ndarray, np.ndarray, float], np.ndarray]
             ) -> np.ndarray:
    """Reference layer-0 V (T, n_head_kv, head_dim) with the given rms_norm."""
    h = norm(m.trace["inp_embd"], m.ref.w("blk.0.attn_norm.weight"), m.ref.params.rms_eps)
    v = m.ref.linear(h, "blk.0.attn_v")
    return v.reshape(len(TOKENS), m.spec.n_head_kv, -1)


def layer0_k(m: Model, positions: np.ndarray, neox: bool) -> np.ndarray:
    """Reference layer-0 K rotated for the given positions, NeoX-style or not."""
    p = m.ref.params
    h = llama_ref.rms_norm(m.trace["inp_embd"], m.ref.w("blk.0.attn_norm.weight"), p.rms_eps)
    k = m.ref.linear(h, "blk.0.attn_k").reshape(len(TOKENS), p.n_head_kv, p.head_dim)
    inv_freq, mscale = llama_ref.rope_inv_freq(p, len(TOKENS))
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]
    return llama_ref.apply_rope(k, np.cos(angles) * mscale, np.sin(angles) * mscale, neox)


def rms_norm_without_tail(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """The bug a vector loop without its scalar tail has: the last n % 16 squares are lost."""
    n = x.shape[-1] - x.shape[-1] % 16
    ms = np.mean(x[..., :n] * x[..., :n], axis=-1, keepdims=True)
    return x / np.sqrt(ms + eps) * w


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("isa", ISAS)
def test_rms_norm_and_rope(models: dict[str, Model], isa: str, name: str) -> None:
    m = models[name]
    _, cache = run(m.path, m.spec, isa)
    v_ref = layer0_v(m, llama_ref.rms_norm)
    assert rel_err(cache.v[0], v_ref) < RTOL_RMS_NORM, (isa, rel_err(cache.v[0], v_ref))
    k_ref = m.trace["blk.0.k_rope"]
    positions = np.arange(len(TOKENS))
    # the reference of this test is the one the forward test uses
    np.testing.assert_allclose(layer0_k(m, positions, m.ref.params.rope_neox), k_ref, atol=1e-12)
    assert rel_err(cache.k[0], k_ref) < RTOL_ROPE, (isa, rel_err(cache.k[0], k_ref))
    # negative controls: a lost vector tail in rms_norm, rotation by the next position, or the
    # other pairing of dimensions are each far outside these bounds
    assert rel_err(cache.v[0], layer0_v(m, rms_norm_without_tail)) > 100 * RTOL_RMS_NORM
    assert rel_err(cache.k[0], layer0_k(m, positions + 1, m.ref.params.rope_neox)) > 0.01
    assert rel_err(cache.k[0], layer0_k(m, positions, not m.ref.params.rope_neox)) > 0.01


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("isa", ISAS)
def test_attention_with_f32_cache(models: dict[str, Model], isa: str, name: str) -> None:
    """Prompt (2 threads: grids split between them) and token-by-token decode."""
    m = models[name]
    for n_threads, decode in ((2, False), (1, True)):
        logits, cache = run(m.path, m.spec, isa, n_threads=n_threads, decode=decode)
        k1 = m.trace["blk.1.k_rope"]
        assert rel_err(cache.k[1], k1) < RTOL_LAYER1_K, (isa, decode, rel_err(cache.k[1], k1))
        assert rel_err(logits, m.logits) < RTOL_LOGITS, (isa, decode, rel_err(logits, m.logits))


@contextmanager
def reference_with_cache(monkeypatch: pytest.MonkeyPatch, ref: LlamaRef, cache: Cache,
                         shift_v: bool = False) -> Iterator[None]:
    """Make the reference attend over the K and V the C++ cache holds (decoded by numpy).

    The reference computes q, k, v per layer in that order; its K is replaced after RoPE and its
    V after the projection, so a lossy cache's rounding is the same on both sides and only the
    attention arithmetic is compared. shift_v: V of each position taken from the one before (a
    negative control).
    """
    calls = {"rope": 0}
    rope = llama_ref.apply_rope

    def rope_then_cache(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool
                        ) -> np.ndarray:
        i = calls["rope"]
        calls["rope"] += 1
        out = rope(x, cos, sin, neox)
        return out if i % 2 == 0 else cache.k[i // 2]  # even calls rotate q, odd ones k

    linear = ref.linear

    def linear_then_cache(x: np.ndarray, name: str) -> np.ndarray:
        if not name.endswith(".attn_v"):
            return linear(x, name)
        v = cache.v[int(name.split(".")[1])].reshape(x.shape[0], -1)
        return np.roll(v, 1, axis=0) if shift_v else v

    with monkeypatch.context() as mp:
        mp.setattr(llama_ref, "apply_rope", rope_then_cache)
        mp.setattr(ref, "linear", linear_then_cache)
        yield


@pytest.mark.parametrize(("name", "kv_type"), [("odd", "f16"), ("wide_group", "f16"),
                                               ("tiled", "f16"), ("tiled", "q8_0"),
                                               ("tiled", "f32")])
@pytest.mark.parametrize("isa", ISAS)
def test_attention_over_lossy_cache(models: dict[str, Model], monkeypatch: pytest.MonkeyPatch,
                                    isa: str, name: str, kv_type: str) -> None:
    """The F16 and Q8_0 row loads of the attention kernels: the reference attends over the
    cache contents decoded by numpy / gguf, so the logits agree as tightly as with F32."""
    m = models[name]
    logits, cache = run(m.path, m.spec, isa, kv_type=kv_type, n_threads=2)
    with reference_with_cache(monkeypatch, m.ref, cache):
        want = m.ref.forward(TOKENS)
    assert rel_err(logits, want) < RTOL_LOGITS, (isa, rel_err(logits, want))
    # the plain reference is much further away: the cache rounding is what is being matched
    if kv_type != "f32":
        assert rel_err(logits, m.logits) > 20 * RTOL_LOGITS
    with reference_with_cache(monkeypatch, m.ref, cache, shift_v=True):
        assert rel_err(logits, m.ref.forward(TOKENS)) > 100 * RTOL_LOGITS


def scaled_k_model(src: Path, dst: Path, head_scales: list[float]) -> Path:
    """A copy of src whose layer-0 K heads are scaled: values in the f16 subnormal range, normal
    ones, and ones past the f16 maximum (65504)."""
    r = GGUFReader(src)
    w = GGUFWriter(dst)
    w.add_metadata(r.metadata, r.value_types)
    for t in r.tensors:
        if t.name == "blk.0.attn_k.weight":
            wk = np.array(t.data, dtype=np.float32)  # (kv_dim, n_embd)
            per_head = wk.reshape(len(head_scales), -1, wk.shape[1])
            per_head *= np.asarray(head_scales, np.float32)[:, None, None]
            w.add_tensor(t.name, wk)
        else:
            w.add_tensor(t.name, t.raw, t.type, t.dims)
    w.write()
    r.close()
    return dst


def f16_truncated(x: np.ndarray) -> np.ndarray:
    """f32 -> f16 rounding towards zero (the bug a conversion without rounding has)."""
    half = x.astype(np.float16)
    too_far = np.abs(half.astype(np.float32)) > np.abs(x)
    toward_zero = np.nextafter(half, np.float16(0))
    return np.where(too_far, toward_zero, half)


@pytest.mark.parametrize("isa", ISAS)
def test_to_f16_rounds_to_nearest_even(tmp_path: Path, isa: str) -> None:
    """The F16 cache rows are the F32 cache rows converted by numpy (round to nearest even,
    subnormals kept, overflow to inf), bit for bit, for kv_dim 3 x 20 (no whole vector)."""
    spec = TinySpec(n_embd=68, n_head=3, n_head_kv=3, head_dim=20, n_ff=100, n_layer=1)
    base = write_tiny(tmp_path / "base.gguf", spec)
    path = scaled_k_model(base, tmp_path / "scaled.gguf", [2e-6, 1.0, 4e4])
    _, f32 = run(path, spec, isa, kv_type="f32")
    _, f16 = run(path, spec, isa, kv_type="f16")
    with np.errstate(over="ignore"):  # numpy warns about the values that become inf
        for raw32, raw16 in ((f32.raw_k[0], f16.raw_k[0]), (f32.raw_v[0], f16.raw_v[0])):
            want = raw32.view(np.float32).astype(np.float16)
            np.testing.assert_array_equal(raw16.view(np.uint16), want.view(np.uint16),
                                          err_msg=isa)
        k = f32.raw_k[0].view(np.float32)
        halves = k.astype(np.float16)
        trunc = f16_truncated(k).view(np.uint16)
    # the cases are there: subnormal results, infinities, and values past the last finite half
    assert np.any((halves != 0) & (np.abs(halves) < np.float16(6.104e-5)))
    assert np.any(np.isinf(halves)) and np.any(np.isfinite(halves) & (np.abs(k) > 32768))
    # negative control: truncation instead of rounding differs on many elements
    assert (trunc != f16.raw_k[0].view(np.uint16)).mean() > 0.2


@pytest.mark.parametrize("isa", ISAS)
def test_isas_agree_with_each_other(models: dict[str, Model], isa: str) -> None:
    """Same inputs, two ISAs: the logits differ only by F32 summation order (with an F32 cache:
    in an F16 one such differences flip roundings, which the test above accounts for)."""
    m = models["tiled"]
    base, _ = run(m.path, m.spec, "scalar")
    got, _ = run(m.path, m.spec, isa)
    assert rel_err(got, base) < RTOL_LOGITS, (isa, rel_err(got, base))
