#!/usr/bin/env python3
"""Compare greedy continuations of pyllm and llama.cpp token by token.

    python bench/greedy_vs_llamacpp.py --llama-simple /path/to/llama-simple [-m model.gguf]
        [-n 32] [-p "prompt" ...]

`llama-simple` (from a llama.cpp build) decodes greedily. For each prompt the script prints how
many leading generated tokens agree (the text each produced, re-tokenized with the model's own
tokenizer). A tool for people; the default prompts are ordinary English sentence starts.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "The three primary colours are",
    "To make a cup of tea, first",
    "The largest planet in our solar system is",
    "Water boils at a temperature of",
]


def llama_simple(binary: str, model: str, prompt: str, n: int) -> str:
    proc = subprocess.run([binary, "-m", model, "-n", str(n), prompt], capture_output=True,
                          text=True, check=True)
    out = proc.stdout
    start = out.find(prompt)
    return out[start + len(prompt):] if start >= 0 else out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-simple", required=True)
    ap.add_argument("-m", "--model")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-p", "--prompt", action="append")
    args = ap.parse_args()

    from pyllm.model import LLM

    llm = LLM(args.model, n_ctx=512)
    tok = llm.tokenizer
    worst = args.n
    for prompt in args.prompt or PROMPTS:
        ours = llm.generate(prompt, max_tokens=args.n, temperature=0.0)
        theirs = llama_simple(args.llama_simple, str(llm.model_path), prompt, args.n)
        a = tok.encode(ours, add_special=False)
        b = tok.encode(theirs, add_special=False)
        same = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            same += 1
        worst = min(worst, same)
        print(f"{same:3d}/{min(len(a), len(b))} tokens agree | {prompt!r}")
        if same < min(len(a), len(b)):
            print(f"      pyllm:     {ours!r}\n      llama.cpp: {theirs!r}")
    print(f"minimum agreement: {worst} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
