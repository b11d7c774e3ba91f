"""HF parity of the C++ forward: tiny random transformers models -> GGUF -> pyllm.LLM logits
equal transformers' logits (64 tokens; GQA/MQA/MHA, tied embeddings, biases, head_dim,
every RoPE scaling transformers supports)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch  # noqa: F401
import transformers  # noqa: F401

from pyllm.runtime.llm import LLM
from pyllm.tools.convert import convert_hf
from tests.test_convert_hf import CASES, hf_logits, make_model, round_matrices, tokens


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Each case saved with save_pretrained and converted once per output type."""
    out: dict[tuple[str, str], Path] = {}
    for name, (kind, overrides) in CASES.items():
        src = tmp_path_factory.mktemp(f"hf-{name}")
        make_model(kind, overrides).save_pretrained(src)
        for outtype in ("f32", "f16"):
            out[name, outtype] = convert_hf(src, src / f"{outtype}.gguf", outtype, progress=False)
    return out


def _expected(case: str, outtype: str) -> Any:
    model = make_model(*CASES[case])
    round_matrices(model, outtype)
    return hf_logits(model, tokens())


@pytest.mark.parametrize("case", list(CASES))
def test_f32_logits_match_transformers(converted: dict[tuple[str, str], Path], case: str) -> None:
    want = _expected(case, "f32")
    with LLM(converted[case, "f32"], n_ctx=128, kv_type="f32") as llm:
        got = llm.logits(tokens())
    assert np.abs(want).max() > 1.0
    assert np.abs(got - want).max() < 1e-3


@pytest.mark.parametrize("case", ["llama_gqa", "qwen2", "llama_yarn", "mistral_head_dim"])
def test_f16_weights_and_default_kv_cache(converted: dict[tuple[str, str], Path],
                                          case: str) -> None:
    """F16 weights with the default F16 KV cache: the cache rounding is the only extra error."""
    want = _expected(case, "f16")
    with LLM(converted[case, "f16"], n_ctx=128) as llm:
        got = llm.logits(tokens())
    err = np.abs(got - want)
    scale = np.abs(want).max()
    # F16 K/V rounding (relative 2**-11) grows with the activations these random weights produce
    assert err.max() < 5e-3 * scale and err.mean() < 5e-4 * scale, (err.max(), err.mean(), scale)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95
