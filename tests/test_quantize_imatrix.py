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
from pyllm.formats.gguf import GGMLType, GGUFReader
from pyllm.formats.imatrix import Imatrix, ImatrixEntry, write_imatrix
from pyllm.tools.quantize import quantize_file
from tests.test_quantize import figure_inputs, file_sha256

FIGURES = Path(__file__).parent / "data" / "llamacpp_imatrix_quant_figures.json"
# file types whose every tensor has an importance-guided quantizer
IMATRIX_TYPES = ("IQ4_NL", "IQ4_XS", "IQ2_XXS")


def tensor_digests(path: Path) -> dict[str, list[str]]:
    """Per tensor: its type and the SHA-256 of its bytes."""
    import hashlib

    with GGUFReader(path) as r:
        return {t.name: [t.type.name, hashlib.sha256(np.ascontiguousarray(t.raw).tobytes())
                         .hexdigest()] for t in r.tensors}


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
        want = figures["types"][name]
        got = tensor_digests(dst)
        assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}, name
        # byte for byte, the IQ2_XXS mix's Q2_K attn_v and first ffn_down included
        assert {k: v[1] for k, v in got.items()} == {k: v[1] for k, v in want.items()}, name
        assert len(result.imatrix_used) == 8 * 7 and result.imatrix_unused == []
        with GGUFReader(dst) as r:
            assert r.metadata["quantize.imatrix.file"] == str(imatrix)
            assert r.metadata["quantize.imatrix.dataset"] == "synthetic.txt"
            assert r.metadata["quantize.imatrix.entries_count"] == 56
            assert r.metadata["quantize.imatrix.chunks_count"] == 4
        if name == "IQ2_XXS":
            continue
        # negative control: the same type without the importance matrix is other bytes
        plain = tmp_path / f"{name}-plain.gguf"
        quantize_file(model, plain, name, threads=2, progress=False)
        plain_digests = tensor_digests(plain)
        assert plain_digests["blk.3.ffn_up.weight"] != want["blk.3.ffn_up.weight"]


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
    result = quantize_file(model, tmp_path / "k.gguf", "Q4_K_M", progress=False, imatrix=imatrix)
    assert len(result.imatrix_unused) == 56 and result.imatrix_used == []  # Q4_K, Q6_K: not yet
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
    with pytest.raises(QuantError, match="importance"):
        from pyllm.formats import qtypes

        qtypes.quantize("IQ4_NL", np.ones((2, 64), np.float32), importance=np.ones(32))
    with pytest.raises(QuantError, match="not implemented"):
        from pyllm.formats import qtypes

        qtypes.quantize("Q4_K", np.ones((2, 256), np.float32), importance=np.ones(256))
    with pytest.raises(QuantError, match="whole rows"):
        from pyllm import _core

        _core.quantize_weighted(2, np.ones(96, np.float32), np.ones(64, np.float32))
    assert GGMLType.IQ4_XS  # the enum the figures name


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
