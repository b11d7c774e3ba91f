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
from tests.test_quantize import figure_inputs, file_sha256, quant_digest

FIGURES = Path(__file__).parent / "data" / "llamacpp_imatrix_quant_figures.json"
# every block-quantized file type (Q8_0 and the ternary types ignore the importance matrix, in
# llama.cpp too)
IMATRIX_TYPES = tuple(name for name, ft in FILE_TYPES.items() if ft.is_mix)


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


def test_very_low_bit_files_need_an_imatrix(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = inputs
    with pytest.raises(QuantError, match="IQ2_XXS needs an importance matrix.*pyllm imatrix"):
        quantize_file(model, tmp_path / "x.gguf", "IQ2_XXS", progress=False)
    from tests.test_cli import run_cli

    proc = run_cli("quantize", str(model), str(tmp_path / "x.gguf"), "IQ2_XXS")
    assert proc.returncode == 1 and proc.stderr.startswith("error: IQ2_XXS needs")
    assert not (tmp_path / "x.gguf").exists()


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
                                        ("IQ4_XS", "Q5_K", "IQ4_XS")):
            plain = {p.name: p.dst_type.name for p in plan_types(r, ftype)}
            guided = {p.name: p.dst_type.name for p in plan_types(r, ftype, imatrix=True)}
            assert (plain["blk.0.ffn_down.weight"], guided["blk.0.ffn_down.weight"]) == (
                without, with_im), ftype
            assert plain["blk.1.ffn_down.weight"] == guided["blk.1.ffn_down.weight"]
