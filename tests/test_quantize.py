"""pyllm.quantize and ``pyllm quantize``: every file type on a tiny model (loads, logits close to
the F32 model, per-tensor types follow llama.cpp's mix rules, sizes), bit-exactness of the legacy
types with the gguf package, requantize refusal, usage errors and atomic output."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pyllm.cli import main as cli_main
from pyllm.errors import QuantError
from pyllm.gguf import GGUFReader, GGUFWriter
from pyllm.gguf.constants import TYPE_INFO, GGMLType
from pyllm.model import LLM
from pyllm.quantize import FILE_TYPES, plan_types, quantize_file, resolve_file_type
from tests.tiny_models import TinySpec, write_tiny

T = GGMLType
N_LAYER = 8
SPEC = TinySpec(n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_layer=N_LAYER, n_vocab=160)
TOKENS = np.random.default_rng(0).integers(0, SPEC.n_vocab, 48)

# Relative RMS error of the logits against the F32 model (measured: F16 8e-4, BF16 6e-3,
# Q8_0 0.02, Q6_K 0.06, Q5_x 0.12-0.14, Q4_x 0.22-0.27, Q3_K_x 0.35-0.53, Q2_K 0.70 — a random
# 8-layer model amplifies weight noise; the bounds leave ~1.5x room).
LOGIT_BOUND = {
    "F32": 1e-6, "F16": 2e-3, "BF16": 1.2e-2, "Q8_0": 4e-2, "Q6_K": 0.12,
    "Q5_0": 0.25, "Q5_1": 0.25, "Q5_K_S": 0.25, "Q5_K_M": 0.25,
    "Q4_0": 0.45, "Q4_1": 0.45, "Q4_K_S": 0.4, "Q4_K_M": 0.4,
    "Q3_K_S": 0.8, "Q3_K_M": 0.65, "Q3_K_L": 0.6, "Q2_K": 1.1,
}


def tame_copy(src: Path, dst: Path, scale: float = 0.25, nan_in: str | None = None) -> Path:
    """``src`` with the block matrices scaled down (a random model with the tiny_models scales
    is chaotic: its logits swing with any weight noise) and optionally a NaN planted."""
    r = GGUFReader(src)
    w = GGUFWriter(dst)
    w.add_metadata(r.metadata, r.value_types)
    for t in r.tensors:
        a = np.array(t.data, dtype=np.float32)
        if a.ndim == 2 and t.name.startswith("blk."):
            a *= scale
        if t.name == nan_in:
            a.flat[a.size // 2] = np.nan
        w.add_tensor(t.name, a)
    w.write()
    r.close()
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("quant")
    f32 = tame_copy(write_tiny(d / "raw.gguf", SPEC), d / "f32.gguf")
    out = {"src": f32}
    for name in FILE_TYPES:
        out[name] = d / f"{name}.gguf"
        quantize_file(f32, out[name], name, threads=2, progress=False)
    return out


def types_of(path: Path) -> dict[str, GGMLType]:
    r = GGUFReader(path)
    out = {t.name: t.type for t in r.tensors}
    r.close()
    return out


def more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def expected_types(ftype: str) -> dict[str, GGMLType]:
    """llama.cpp's llama_tensor_get_type for the tiny llama (8 layers, n_gqa 2, untied output,
    every row a multiple of 256), written out per mix."""
    ft = FILE_TYPES[ftype]
    bulk = ft.bulk
    out_t = bulk if not ft.is_mix or bulk == T.Q8_0 else T.Q6_K
    exp = {"token_embd.weight": bulk, "output.weight": out_t, "output_norm.weight": T.F32}
    more = {i for i in range(N_LAYER) if more_bits(i, N_LAYER)}
    assert more == {0, 3, 6, 7}
    for i in range(N_LAYER):
        v = down = attn_out = bulk
        if ftype == "Q2_K":
            v, down, attn_out = T.Q3_K, T.Q3_K, T.Q3_K
        elif ftype == "Q3_K_M":
            v, down, attn_out = (T.Q5_K if i < 2 else T.Q4_K), T.Q4_K, T.Q4_K
        elif ftype == "Q3_K_L":
            v, down, attn_out = T.Q5_K, T.Q5_K, T.Q5_K
        elif ftype == "Q4_K_S":
            v = T.Q5_K if i < 4 else T.Q4_K
            down = T.Q5_K if i < 1 else T.Q4_K
        elif ftype in ("Q4_K_M", "Q5_K_M"):
            v = down = T.Q6_K if i in more else bulk
        p = f"blk.{i}."
        exp.update({p + "attn_norm.weight": T.F32, p + "ffn_norm.weight": T.F32,
                    p + "attn_q.weight": bulk, p + "attn_k.weight": bulk, p + "attn_v.weight": v,
                    p + "attn_output.weight": attn_out, p + "ffn_gate.weight": bulk,
                    p + "ffn_up.weight": bulk, p + "ffn_down.weight": down})
    return exp


@pytest.mark.parametrize("ftype", list(FILE_TYPES))
def test_every_type_loads_with_close_logits_and_mix_types(models: dict[str, Path],
                                                          ftype: str) -> None:
    assert types_of(models[ftype]) == expected_types(ftype)
    r = GGUFReader(models[ftype])
    assert r.metadata["general.file_type"] == FILE_TYPES[ftype].ftype
    assert r.metadata["general.quantization_version"] == 2
    assert r.metadata["general.name"] == "tiny-llama"  # metadata copied
    assert r.metadata["llama.block_count"] == N_LAYER
    r.close()
    ref = LLM(models["src"], n_ctx=64, n_threads=2).logits(TOKENS)
    got = LLM(models[ftype], n_ctx=64, n_threads=2).logits(TOKENS)
    err = float(np.sqrt(((got - ref) ** 2).mean() / (ref**2).mean()))
    assert np.isfinite(got).all()
    assert err < LOGIT_BOUND[ftype], err


def test_sizes(models: dict[str, Path]) -> None:
    size = {name: models[name].stat().st_size for name in FILE_TYPES}
    order = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
             "Q6_K", "Q8_0", "F16", "F32"]
    assert [size[n] for n in order] == sorted(size[n] for n in order)
    assert size["Q4_0"] < size["Q4_1"] < size["Q5_0"] < size["Q5_1"] < size["Q8_0"]
    assert size["F16"] == size["BF16"]
    for name in FILE_TYPES:
        r = GGUFReader(models[name])
        n_weights = sum(t.n_elements for t in r.tensors)
        data = sum(t.nbytes for t in r.tensors)
        # the tensor data is what the types say, and it is nearly all of the file
        assert data == sum(t.n_elements // TYPE_INFO[t.type].block_size
                           * TYPE_INFO[t.type].type_size for t in r.tensors)
        assert r.file_size - data < 8192
        r.close()
        bpw = 8 * data / n_weights
        lo, hi = {"Q2_K": (2.6, 3.4), "Q4_K_M": (4.5, 5.2), "Q8_0": (8.4, 8.6),
                  "F16": (16.0, 16.2), "F32": (32.0, 32.0)}.get(name, (2.5, 32.0))
        assert lo <= bpw <= hi, (name, bpw)


@pytest.mark.parametrize("ftype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_legacy_types_bit_exact_with_gguf(tmp_path: Path, ftype: str) -> None:
    gq = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    spec = TinySpec(n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_layer=1, n_vocab=64,
                    wtype=T.F16)
    src = write_tiny(tmp_path / "f16.gguf", spec)
    dst = tmp_path / "q.gguf"
    quantize_file(src, dst, ftype, progress=False)
    r_src, r_dst = GGUFReader(src), GGUFReader(dst)
    checked = 0
    for t in r_dst.tensors:
        if t.type != T[ftype]:
            continue
        values = np.asarray(r_src.tensor(t.name).data, dtype=np.float32)
        want = gq.quantize(values, GGMLQuantizationType[ftype])
        assert np.array_equal(np.asarray(t.data), want), t.name
        checked += 1
    assert checked >= 7  # token_embd and every block matrix (output is Q6_K except for Q8_0)
    r_src.close()
    r_dst.close()


def _plan(tmp_path: Path, ftype: str, **spec: object) -> dict[str, GGMLType]:
    path = write_tiny(tmp_path / "p.gguf", TinySpec(**spec))  # type: ignore[arg-type]
    r = GGUFReader(path)
    out = {p.name: p.dst_type for p in plan_types(r, ftype)}
    r.close()
    return out


def test_tied_embeddings_take_the_output_rule(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "Q4_0", n_embd=256, n_ff=512, tied=True)
    assert "output.weight" not in plan
    assert plan["token_embd.weight"] == T.Q6_K
    assert plan["blk.0.attn_q.weight"] == T.Q4_0


def test_gqa_and_row_length_fallbacks(tmp_path: Path) -> None:
    # n_gqa 4: Q2_K gives attn_v Q4_K
    plan = _plan(tmp_path, "Q2_K", n_embd=256, n_head=4, n_head_kv=1, n_ff=512)
    assert plan["blk.0.attn_v.weight"] == T.Q4_K
    # rows of 320 are not whole 256-blocks: Q4_K -> Q5_0, Q6_K -> Q8_0, Q3_K -> Q4_0;
    # rows of 336 are not whole 32-blocks either: F16
    plan = _plan(tmp_path, "Q4_K_M", n_embd=256, n_ff=320, n_layer=8)
    assert plan["blk.0.ffn_down.weight"] == T.Q8_0  # more bits: Q6_K -> Q8_0
    assert plan["blk.1.ffn_down.weight"] == T.Q5_0  # Q4_K -> Q5_0
    assert plan["blk.1.ffn_up.weight"] == T.Q4_K  # rows of n_embd = 256
    assert _plan(tmp_path, "Q3_K_S", n_embd=256, n_ff=320)["blk.0.ffn_down.weight"] == T.Q4_0
    assert _plan(tmp_path, "Q5_K_S", n_embd=256, n_ff=320)["blk.0.ffn_down.weight"] == T.Q5_1
    assert _plan(tmp_path, "Q4_0", n_embd=256, n_ff=336)["blk.0.ffn_down.weight"] == T.F16
    # embeddings of 96: output Q6_K -> Q8_0; 1-D tensors untouched
    plan = _plan(tmp_path, "Q4_K_M", n_embd=96, n_head=4, n_ff=256)
    assert plan["output.weight"] == T.Q8_0 and plan["blk.0.attn_q.weight"] == T.Q5_0
    assert plan["blk.0.attn_norm.weight"] == T.F32


def test_fallback_file_loads(tmp_path: Path) -> None:
    src = write_tiny(tmp_path / "s.gguf", TinySpec(n_embd=96, n_head=4, n_ff=320, n_layer=2))
    dst = tmp_path / "d.gguf"
    res = quantize_file(src, dst, "Q4_K_M", progress=False)
    assert res.n_fallback > 0
    toks = TOKENS[:16] % 160
    ref = LLM(src, n_ctx=32, n_threads=2).logits(toks)
    got = LLM(dst, n_ctx=32, n_threads=2).logits(toks)
    assert np.isfinite(got).all()
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.9


def test_requantize_needs_permission(models: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "rq.gguf"
    with pytest.raises(QuantError, match="already quantized"):
        quantize_file(models["Q4_0"], dst, "Q4_K_M", progress=False)
    assert cli_main(["quantize", str(models["Q4_0"]), str(dst), "Q4_K_M"]) == 1
    assert "allow-requantize" in capsys.readouterr().err
    assert not dst.exists()
    # the same type needs no requantization: tensors are copied byte for byte
    quantize_file(models["Q4_0"], dst, "Q4_0", progress=False)
    with GGUFReader(models["Q4_0"]) as a, GGUFReader(dst) as b:
        assert [(t.name, t.type) for t in a.tensors] == [(t.name, t.type) for t in b.tensors]
        assert all(np.array_equal(x.raw, y.raw) for x, y in zip(a.tensors, b.tensors, strict=True))
    assert cli_main(["quantize", "--allow-requantize", "--quiet", str(models["Q4_0"]),
                     str(dst), "Q5_1"]) == 0
    assert types_of(dst) == {**expected_types("Q5_1"), "output.weight": T.Q6_K}


def test_cli_usage_errors_and_output(models: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "o.gguf"
    with pytest.raises(SystemExit) as e:
        cli_main(["quantize", str(models["src"]), str(dst), "Q9_Z"])
    assert e.value.code == 2
    assert "Q4_K_M" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["quantize", str(models["src"]), str(dst), "Q4_0", "--threads", "0"])
    assert e.value.code == 2
    assert not dst.exists()
    assert cli_main(["quantize", str(models["src"]), str(dst), "q4_k", "-t", "2"]) == 0
    out, err = capsys.readouterr()
    assert "size before:" in out and "size after:" in out and "Q4_K_M" in out
    assert "quantizing" in err or "attn_q" in err  # tqdm bar or plain progress lines
    assert types_of(dst) == expected_types("Q4_K_M")  # q4_k is llama-quantize's alias
    assert cli_main(["quantize", str(tmp_path / "missing.gguf"), str(dst), "Q4_0"]) == 1
    assert resolve_file_type(15).name == "Q4_K_M"


def test_failure_leaves_no_partial_output(models: dict[str, Path], tmp_path: Path) -> None:
    bad = tame_copy(write_tiny(tmp_path / "raw.gguf", SPEC), tmp_path / "bad.gguf",
                    nan_in=f"blk.{N_LAYER - 1}.ffn_down.weight")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "q.gguf"
    with pytest.raises(QuantError, match="NaN"):
        quantize_file(bad, dst, "Q8_0", threads=2, progress=False)
    assert os.listdir(out_dir) == []  # neither the output nor a temp file
    dst.write_bytes(b"old")
    with pytest.raises(QuantError):
        quantize_file(bad, dst, "Q4_0", progress=False)
    assert dst.read_bytes() == b"old"
    with pytest.raises(QuantError, match="different file"):
        quantize_file(bad, bad, "Q4_0", progress=False)


def test_matches_llama_cpp_quantizer(models: dict[str, Path], tmp_path: Path) -> None:
    """Byte-for-byte against llama.cpp's own quantizer, where llama-cpp-python is installed (it
    is not a dependency: building it takes many minutes). Measured with llama-cpp-python 0.3.36:
    every type gives the same file size, per-tensor types and tensor bytes, on this model and on
    SmolLM2-135M converted to F16 (tied embeddings, rows of 576: the fallback paths)."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    for name, ft in FILE_TYPES.items():
        dst = tmp_path / f"llama_{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ft.ftype
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(models["src"]).encode(), str(dst).encode(),
                                            ctypes.byref(params))
        assert rc == 0, name
        with GGUFReader(models[name]) as ours, GGUFReader(dst) as theirs:
            assert ours.metadata["general.file_type"] == theirs.metadata["general.file_type"]
            a = {t.name: t for t in ours.tensors}
            for t in theirs.tensors:
                assert a[t.name].type == t.type, (name, t.name)
                assert np.array_equal(a[t.name].raw, t.raw), (name, t.name)
        assert models[name].stat().st_size == dst.stat().st_size, name
