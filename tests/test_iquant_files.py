"""SmolLM2 quantized by ``pyllm quantize`` to every i-quant and ternary file type, through the
whole forward: the accuracy bar of the other types holds for the new ones (against the float
reference forward of the same file's dequantized weights, KL < 1e-5 and the same top-1
everywhere, as tests/test_model.py's SmolLM2 test), with and without the rows16 repacks.

The ternary types are the exception, for a reason of the model, not the kernels: SmolLM2 forced to
ternary weights is a model nobody runs, whose logits move with any rounding of its activations.
Measured against the float64 reference of the same file: F16 K/V (the default) alone gives KL
2.9e-3 with exact F32 math (scalar ISA); with F32 K/V, F32 math 1.5e-8, while the int16 rounding
of activations gives 8e-5 (AVX2: only the Q4_K output matrix's decode kernel rounds) and 2.2e-4
(AVX-512: every matrix). So they are checked with F32 K/V, at the bar on the F32-math ISA and at
a bound set from those measurements on the active one; tests/test_model.py holds their kernels
to the bar on random tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pyllm.formats.gguf import GGUFReader
from pyllm.formats.imatrix import Imatrix

# the i-quant and ternary file types (pyllm.tools.quantize.FILE_TYPES has each one's bulk type)
FILE_TYPES = ["IQ4_NL", "IQ4_XS", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S",
              "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "TQ1_0", "TQ2_0"]
# 40+ tokens: the prompt runs through the prefill kernels (AVX-512: from 32 tokens), not decode's
TEXT = ("The capital of France is Paris. It lies on the Seine, and its museums, cafes and parks "
        "draw millions of visitors every year; the city has been a centre of art, science and "
        "politics for centuries.")


@pytest.fixture(scope="module")
def smol_imatrix(smollm2_path: Path) -> Imatrix:
    """An importance matrix of SmolLM2 over two chunks of the README (the IQ2 types need one)."""
    from pyllm.runtime.llm import LLM
    from pyllm.tools.imatrix import compute_imatrix
    from pyllm.tools.perplexity import tokenize_text

    readme = Path(__file__).parent.parent / "README.md"
    with LLM(smollm2_path, n_ctx=128) as llm:
        toks = tokenize_text(llm, readme.read_text(encoding="utf-8"))
        return compute_imatrix(llm, toks, 128, n_chunks=2)


@pytest.fixture(scope="module")
def tokens(smollm2_path: Path) -> list[int]:
    from pyllm.runtime.llm import LLM

    with LLM(smollm2_path, n_ctx=128) as llm:
        toks = [int(t) for t in llm.tokenize(TEXT)]
    assert len(toks) >= 40
    return toks


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl(p_log: np.ndarray, q_log: np.ndarray) -> float:
    return float((np.exp(p_log) * (p_log - q_log)).sum(-1).mean())


@pytest.mark.slow
@pytest.mark.parametrize("ftype", FILE_TYPES)
def test_smollm2_file_type_matches_the_exact_model(smollm2_path: Path, tmp_path: Path,
                                                   smol_imatrix: Imatrix, tokens: list[int],
                                                   ftype: str) -> None:
    from pyllm.runtime.llm import LLM
    from pyllm.tools.quantize import FILE_TYPES as ALL_FILE_TYPES
    from pyllm.tools.quantize import quantize_file
    from tests.reference.llama_ref import LlamaRef

    path = tmp_path / f"{ftype}.gguf"
    ft = ALL_FILE_TYPES[ftype]
    imatrix = smol_imatrix if ft.needs_imatrix else None
    quantize_file(smollm2_path, path, ftype, allow_requantize=True, threads=2, progress=False,
                  imatrix=imatrix)
    with GGUFReader(path) as r:
        kinds = {t.type for t in r.tensors if len(t.dims) == 2}
    assert ft.bulk in kinds, kinds
    want = LlamaRef(str(path), dtype=np.float32).forward(tokens).astype(np.float64)
    p_log = _log_softmax(want)
    # negative control: the Q4_1 original is a different model, far outside the bar
    with LLM(smollm2_path, n_ctx=64) as llm:
        other = llm.logits(tokens).astype(np.float64)
    assert _kl(p_log, _log_softmax(other)) > 1e-3
    if ftype.startswith("TQ"):  # see the module doc
        from pyllm import _core

        active = _core.active_isa()
        try:
            _core.set_active_isa("scalar")
            with LLM(path, n_ctx=64, kv_type="f32") as llm:
                got = llm.logits(tokens).astype(np.float64)
        finally:
            _core.set_active_isa(active)
        assert _kl(p_log, _log_softmax(got)) < 1e-7
        assert (got.argmax(-1) == want.argmax(-1)).all()
        with LLM(path, n_ctx=64, kv_type="f32") as llm:
            got = llm.logits(tokens).astype(np.float64)
        assert _kl(p_log, _log_softmax(got)) < 3e-4
        return
    for repack in (False, True):
        with LLM(path, n_ctx=64, repack=repack) as llm:
            got = llm.logits(tokens).astype(np.float64)
        # measured 4e-7 (IQ4_XS, IQ4_NL) .. 1e-6 (IQ3_S)
        kl = _kl(p_log, _log_softmax(got))
        assert kl < 1e-5, f"repack={repack}: KL {kl:.3g}"
        # the same top token wherever the exact model's is clear: at a near-tie (top two
        # within 0.05) float rounding may pick either (an IQ2_M file had one such position)
        top2 = np.sort(want, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 0.05
        assert clear.mean() > 0.8  # the check stays about most positions
        assert (got.argmax(-1) == want.argmax(-1))[clear].all()
