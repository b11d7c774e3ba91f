"""Quantization guided by an importance matrix (``pyllm quantize --imatrix``), against llama.cpp.

tests/data/llamacpp_imatrix_quant_figures.json holds what llama.cpp's ``llama-quantize
--imatrix`` wrote for test_quantize's deterministic 8-layer model with the deterministic
importance matrix of ``synthetic_imatrix`` (written by pyllm: llama.cpp reading it is part of
the check), per file type: the tensors' digest. tests/data/make_llamacpp_imatrix_quant_figures.py
made them and says how.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pyllm.errors import QuantError
from pyllm.formats.gguf import GGUFReader
from pyllm.formats.imatrix import Imatrix, ImatrixEntry, write_imatrix
from pyllm.tools.quantize import FILE_TYPES, quantize_file
from tests.test_quantize import figure_inputs, file_sha256, quant_digest, tame_copy
from tests.tiny_models import TinySpec, write_tiny

FIGURES = Path(__file__).parent / "data" / "llamacpp_imatrix_quant_figures.json"
# every block-quantized file type (Q8_0 and the ternary types ignore the importance matrix, in
# llama.cpp too)
IMATRIX_TYPES = tuple(name for name, ft in FILE_TYPES.items() if ft.is_mix)
# the i-quant mixes, whose rules also depend on gqa >= 4, tied embeddings and the layer range
# (IQ3_XS's middle ffn_gate / ffn_up): checked on GQA4_SPEC's model too
GQA4_TYPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M", "IQ3_XXS", "IQ3_XS",
              "IQ3_S", "IQ3_M")
GQA4_SPEC = TinySpec(n_embd=256, n_head=4, n_head_kv=1, n_ff=512, n_layer=16, n_vocab=160,
                     tied=True)


def gqa4_model(folder: Path) -> Path:
    """A deterministic 16-layer llama with 4 query heads per KV head and tied embeddings."""
    return tame_copy(write_tiny(folder / "gqa4-raw.gguf", GQA4_SPEC), folder / "gqa4.gguf")


def synthetic_imatrix(model: Path) -> Imatrix:
    """Log-normal importances (spread over two orders of magnitude, as real ones are) for every
    block matrix of ``model``, from a fixed seed."""
    rng = np.random.default_rng(20261204)
    im = Imatrix(datasets=["synthetic.txt"], chunk_count=4, chunk_size=512)
    with GGUFReader(model) as r:
        for t in sorted(r.tensors, key=lambda t: t.name):
            if t.name.startswith("blk.") and len(t.dims) == 2:
                sums = rng.lognormal(0.0, 1.2, t.dims[0]).astype(np.float32) * 2048
                im.entries[t.name] = ImatrixEntry(sums.reshape(1, -1), np.array([2048]))
    return im


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("imq")
    model = figure_inputs(folder)["tiny8"]
    imatrix = folder / "imatrix.gguf"
    write_imatrix(synthetic_imatrix(model), imatrix)
    return model, imatrix


def test_matches_llama_cpp_quantizer_with_an_imatrix(inputs: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    figures = json.loads(FIGURES.read_text(encoding="utf-8"))
    model, imatrix = inputs
    assert file_sha256(model) == figures["input_sha256"], "inputs changed: regenerate"
    # the very file llama.cpp read
    assert file_sha256(imatrix) == figures["imatrix_sha256"], "imatrix changed: regenerate"
    for name in IMATRIX_TYPES:
        dst = tmp_path / f"{name}.gguf"
        result = quantize_file(model, dst, name, threads=2, progress=False, imatrix=imatrix)
        got = quant_digest(dst)
        got.pop("file_size")  # the metadata names the imatrix file's path
        # every tensor's type and bytes, of every mix
        assert got == figures["types"][name], name
        assert len(result.imatrix_used) + len(result.imatrix_unused) == 8 * 7
        # Q8_0 and the ternary types take no importance matrix (in llama.cpp either)
        assert (result.imatrix_unused == []) == (name not in ("Q8_0", "TQ1_0", "TQ2_0")), name
        with GGUFReader(dst) as r:
            assert r.metadata["quantize.imatrix.file"] == str(imatrix)
            assert r.metadata["quantize.imatrix.dataset"] == "synthetic.txt"
            assert r.metadata["quantize.imatrix.entries_count"] == 56
            assert r.metadata["quantize.imatrix.chunks_count"] == 4
        if name not in ("IQ4_NL", "IQ4_XS", "Q4_K_M"):
            continue
        # negative control: the same type without the importance matrix is other bytes
        plain = tmp_path / f"{name}-plain.gguf"
        quantize_file(model, plain, name, threads=2, progress=False)
        assert quant_digest(plain)["tensors_sha256"] != got["tensors_sha256"]


def test_matches_llama_cpp_on_a_gqa4_tied_model(tmp_path: Path) -> None:
    """The i-quant mixes on GQA4_SPEC's model (attn_v Q4_K at gqa >= 4, the tied token_embd
    taking the output rule, 16 layers): every tensor's type and bytes as llama-quantize
    --imatrix wrote them."""
    figures = json.loads(FIGURES.read_text(encoding="utf-8"))["gqa4"]
    model = gqa4_model(tmp_path)
    imatrix = tmp_path / "imatrix.gguf"
    write_imatrix(synthetic_imatrix(model), imatrix)
    assert file_sha256(model) == figures["input_sha256"], "inputs changed: regenerate"
    assert file_sha256(imatrix) == figures["imatrix_sha256"], "imatrix changed: regenerate"
    for name in GQA4_TYPES:
        dst = tmp_path / f"{name}.gguf"
        quantize_file(model, dst, name, threads=2, progress=False, imatrix=imatrix)
        got = quant_digest(dst)
        got.pop("file_size")
        assert got == figures["types"][name], name
        dst.unlink()


# the file types llama-quantize refuses without an importance matrix (its own refusal, checked)
NEEDS_IMATRIX = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M", "IQ3_XXS", "IQ3_XS"]


def test_the_files_that_need_an_imatrix_are_llama_cpps() -> None:
    assert [n for n, ft in FILE_TYPES.items() if ft.needs_imatrix] == NEEDS_IMATRIX


@pytest.mark.parametrize("name", NEEDS_IMATRIX)
def test_very_low_bit_files_need_an_imatrix(inputs: tuple[Path, Path], tmp_path: Path,
                                            name: str) -> None:
    """The files llama.cpp makes only with an importance matrix (1-2 bit i-quants, and the IQ3
    mixes with IQ3_XXS tensors) are refused without one, before any work: a typed error naming
    the grid type and how to make one; in the CLI one `error:` line, exit 1, no output file."""
    model, _ = inputs
    with pytest.raises(QuantError, match=f"^{name} needs an importance matrix: the grid search "
                                         r"of its IQ\d_\w+ tensors.*pyllm imatrix"):
        quantize_file(model, tmp_path / "x.gguf", name, progress=False)
    from tests.test_cli import run_cli

    proc = run_cli("quantize", str(model), str(tmp_path / "x.gguf"), name)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {name} needs an importance")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_grid_tensors_need_their_imatrix_entry(inputs: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    """As llama.cpp ("missing importance matrix for tensor ... in a very low-bit
    quantization"): an importance matrix without the entry of a tensor the mix makes IQ1_S,
    IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S or IQ3_XXS is refused, naming the tensor; a tensor of another
    type is quantized without guidance."""
    model, _ = inputs
    im = synthetic_imatrix(model)
    del im.entries["blk.2.attn_q.weight"]  # IQ3_XS: IQ3_XXS; IQ3_M: IQ3_S
    with pytest.raises(QuantError, match="no entry for blk.2.attn_q.weight, which IQ3_XXS"):
        quantize_file(model, tmp_path / "x.gguf", "IQ3_XS", progress=False, imatrix=im)
    assert not (tmp_path / "x.gguf").exists()
    result = quantize_file(model, tmp_path / "m.gguf", "IQ3_M", progress=False, imatrix=im)
    assert "blk.2.attn_q.weight" not in result.imatrix_used
    assert len(result.imatrix_used) == 55


def test_importance_lowers_the_weighted_error(inputs: tuple[Path, Path]) -> None:
    """What the importance is for: the error weighted by it is smaller than without it."""
    from pyllm.formats import qtypes

    model, _ = inputs
    im = synthetic_imatrix(model)
    with GGUFReader(model) as r:
        t = r.tensor("blk.3.ffn_up.weight")
        x = np.array(t.data, dtype=np.float32).reshape(t.shape)
    w = im.weights("blk.3.ffn_up.weight")
    assert w is not None
    for name in ("IQ4_NL", "IQ4_XS"):
        errs = []
        for importance in (None, w):
            back = qtypes.dequantize(name, qtypes.quantize(name, x, importance=importance),
                                     x.shape)
            errs.append(float((((back - x) ** 2) * w).sum()))
        assert errs[1] < 0.9 * errs[0], (name, errs)


def test_types_without_an_importance_quantizer_are_listed(inputs: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    model, imatrix = inputs
    result = quantize_file(model, tmp_path / "k.gguf", "Q8_0", progress=False, imatrix=imatrix)
    assert len(result.imatrix_unused) == 56 and result.imatrix_used == []  # Q8_0 takes none
    from tests.test_cli import run_cli

    proc = run_cli("quantize", str(model), str(tmp_path / "x.gguf"), "IQ4_XS", "--imatrix",
                   str(imatrix), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "importance matrix: used for 56 tensors" in proc.stdout


def test_imatrix_of_another_model_is_refused(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = inputs
    im = synthetic_imatrix(model)
    im.entries["blk.0.attn_q.weight"] = ImatrixEntry(np.ones((1, 64), np.float32),
                                                     np.array([1]))
    with pytest.raises(QuantError, match="blk.0.attn_q.weight.*another model"):
        quantize_file(model, tmp_path / "x.gguf", "IQ4_NL", progress=False, imatrix=im)
    assert not (tmp_path / "x.gguf").exists()
    from pyllm.formats import qtypes

    with pytest.raises(QuantError, match="importance"):
        qtypes.quantize("IQ4_NL", np.ones((2, 64), np.float32), importance=np.ones(32))
    with pytest.raises(QuantError, match="Q8_0 has no importance-guided quantizer"):
        qtypes.quantize("Q8_0", np.ones((2, 256), np.float32), importance=np.ones(256))
    with pytest.raises(QuantError, match="whole rows"):
        from pyllm import _core

        _core.quantize_weighted(2, np.ones(96, np.float32), np.ones(64, np.float32))


def test_mix_rules_that_depend_on_an_imatrix(inputs: tuple[Path, Path]) -> None:
    """llama.cpp's: with an importance matrix the Q4_0 / Q5_0 mixes give the first eighth of
    ffn_down Q4_1 / Q5_1, and the IQ4 mixes drop their Q5_K first ffn_down."""
    from pyllm.formats.gguf.split import open_gguf
    from pyllm.tools.quantize import plan_types

    model, _ = inputs
    with open_gguf(model) as r:
        for ftype, without, with_im in (("Q4_0", "Q4_0", "Q4_1"), ("Q5_0", "Q5_0", "Q5_1"),
                                        ("IQ4_XS", "Q5_K", "IQ4_XS"),
                                        ("IQ3_XXS", "Q4_K", "IQ3_XXS")):
            plain = {p.name: p.dst_type.name for p in plan_types(r, ftype)}
            guided = {p.name: p.dst_type.name for p in plan_types(r, ftype, imatrix=True)}
            assert (plain["blk.0.ffn_down.weight"], guided["blk.0.ffn_down.weight"]) == (
                without, with_im), ftype
            if ftype != "IQ3_XXS":
                assert plain["blk.1.ffn_down.weight"] == guided["blk.1.ffn_down.weight"]
        # IQ3_XXS (a file llama.cpp makes only with one, but its rules still say): attn_v and
        # the other ffn_down IQ3_S / Q3_K without an importance matrix
        plain = {p.name: p.dst_type.name for p in plan_types(r, "IQ3_XXS")}
        guided = {p.name: p.dst_type.name for p in plan_types(r, "IQ3_XXS", imatrix=True)}
        assert (plain["blk.1.attn_v.weight"], guided["blk.1.attn_v.weight"]) == (
            "IQ3_S", "IQ3_XXS")
        assert (plain["blk.1.ffn_down.weight"], guided["blk.1.ffn_down.weight"]) == (
            "Q3_K", "IQ3_XXS")
