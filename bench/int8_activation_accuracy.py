#!/usr/bin/env python3
"""What rounding matmul activations to 8 bits would cost in accuracy (the prefill trade-off).

    python bench/int8_activation_accuracy.py [-m SmolLM2-135M-Instruct.Q4_1.gguf] [-n 512]

pyllm's integer kernels round activations to 16-bit steps per block of 32 (VPDPWSSD, or two
VPDPBUSD per weight group). 8-bit steps like ggml's Q8_0 (one VPDPBUSD) would double the
multiply-add rate, which is what a 2x-over-llama.cpp prefill needs. This script measures the
accuracy that costs on the forward issue's own bar (mean KL < 0.0015 and top-1 >= 98.5 % against
the exact model over 512 tokens of English): the numpy reference forward of tests/reference,
with every linear layer's input rounded as configured, against the same forward unrounded.

Configurations: "q8" rounds every block of 32 like ggml (scale amax / 127, round to nearest);
"q8 keep F" keeps the fraction F of blocks with the largest amax exact (per panel of P tokens:
what a kernel could do by running the 16-bit path on those blocks only). A tool for people,
not part of the test suite (a few seconds per configuration per 100 tokens).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.reference.llama_ref import LlamaRef  # noqa: E402

CONFIGS = [(0.0, 1), (0.1, 1), (0.2, 1), (0.35, 1), (0.5, 1), (0.5, 6)]


def round_q8(x: np.ndarray, keep: float, panel: int) -> np.ndarray:
    """x (T, K) with each block of 32 rounded to int8 steps, except the fraction ``keep`` of
    blocks with the largest amax in each panel of ``panel`` tokens."""
    t, k = x.shape
    xb = x.reshape(t, k // 32, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    d = amax / 127.0
    q = np.round(np.divide(xb, d, out=np.zeros_like(xb), where=d > 0)) * d
    if keep > 0:
        exact = np.zeros(amax.shape[:2], dtype=bool)
        n_keep = int(round(keep * (k // 32)))
        for t0 in range(0, t, panel):
            top = np.argsort(-amax[t0:t0 + panel, :, 0].max(0))[:n_keep]
            exact[t0:t0 + panel, top] = True
        q = np.where(exact[..., None], xb, q)
    return q.reshape(t, k)


class RoundedRef(LlamaRef):
    """The reference forward with every linear layer's input rounded (None: exact)."""

    config: tuple[float, int] | None = None

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        if self.config is not None:
            x = round_q8(x, *self.config)
        return super().linear(x, name)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def compare(exact: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    lp, lq = log_softmax(exact), log_softmax(got)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    return kl, float((exact.argmax(-1) == got.argmax(-1)).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", help="GGUF file (default: the default model)")
    ap.add_argument("-n", type=int, default=512, help="tokens of tests/data/english.txt")
    args = ap.parse_args()
    from pyllm.runtime.default_model import ensure_model
    from pyllm.runtime.llm import LLM

    path = args.model or str(ensure_model(quiet=True))
    text = (ROOT / "tests" / "data" / "english.txt").read_text()
    with LLM(path, n_ctx=max(args.n, 64)) as llm:
        tokens = llm.tokenize(text)[: args.n]
    ref = RoundedRef(path, dtype=np.float32)
    exact: Any = ref.forward(tokens).astype(np.float64)
    print(f"{Path(path).name}, {len(tokens)} tokens; bar: KL < 0.0015, top-1 >= 98.5 %")
    print("| activations | blocks kept exact | mean KL | top-1 |")
    print("| --- | ---: | ---: | ---: |")
    for keep, panel in CONFIGS:
        ref.config = (keep, panel)
        kl, top1 = compare(exact, ref.forward(tokens).astype(np.float64))
        kept = f"{keep:.0%} per {panel} token{'s' if panel > 1 else ''}" if keep else "none"
        print(f"| int8 (Q8_0-style) | {kept} | {kl:.2e} | {100 * top1:.2f} % |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
