"""The real model against the exact model: SmolLM2-135M-Instruct Q4_1 through pyllm vs
transformers on the same (dequantized) weights, over 512 tokens of ordinary English text.

Bars from the forward issue: mean KL(transformers || pyllm) < 0.0015 and top-1 agreement >=
98.5 % (llama.cpp scores 0.0030 / 96.7 % here because it rounds activations to 8 bits).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pyllm.model import LLM

N_TOKENS = 512
TEXT = Path(__file__).with_name("data") / "english.txt"


@pytest.fixture(scope="module")
def hf_model(smollm2_path: Path):  # type: ignore[no-untyped-def]
    """transformers' model of the same GGUF (it dequantizes the weights itself)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@pytest.mark.slow
@pytest.mark.model
def test_smollm2_kl_and_top1_vs_transformers(smollm2_path: Path, hf_model) -> None:  # type: ignore[no-untyped-def]
    import torch

    with LLM(smollm2_path, n_ctx=N_TOKENS) as llm:
        tokens = llm.tokenize(TEXT.read_text(encoding="utf-8"), add_special=False)[:N_TOKENS]
        assert len(tokens) == N_TOKENS
        ours = llm.logits(tokens)

    with torch.no_grad():
        want = hf_model(torch.tensor([tokens])).logits[0].double().numpy()

    p_log = log_softmax(want)
    q_log = log_softmax(ours)
    kl = (np.exp(p_log) * (p_log - q_log)).sum(-1)
    top1 = (want.argmax(-1) == ours.argmax(-1)).mean()
    print(f"SmolLM2 Q4_1 vs transformers, {N_TOKENS} tokens: mean KL {kl.mean():.2e}, "
          f"max KL {kl.max():.2e}, top-1 {100 * top1:.2f} %")
    assert kl.mean() < 0.0015
    assert top1 >= 0.985


# pyllm's greedy replies are the exact model's. llama.cpp's part from them on near-ties (its
# 8-bit activations and f16 attention): on the first prompt here after 1 token, while the second
# agrees for 19-24 tokens. Over 40 ordinary prompts pyllm agrees with llama.cpp as often as
# llama.cpp with flash attention on agrees with itself with it off (bench/greedy_vs_llamacpp.py,
# results in bench/README.md).
GREEDY_PROMPTS = ["To make a cup of tea, first", "The largest planet in our solar system is"]


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("prompt", GREEDY_PROMPTS)
def test_smollm2_greedy_equals_transformers(smollm2_path: Path, hf_model,  # type: ignore[no-untyped-def]
                                            prompt: str) -> None:
    import torch

    with LLM(smollm2_path, n_ctx=128) as llm:
        ids = llm.tokenize(prompt)
        logits = llm.eval_prompt(ids)
        greedy = []
        for _ in range(24):
            greedy.append(int(logits.argmax()))
            logits = llm.eval([greedy[-1]])
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    want = out[0, len(ids):].tolist()
    assert greedy == want[: len(greedy)]
