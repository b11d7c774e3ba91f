#!/usr/bin/env python3
"""Greedy continuations of pyllm, llama.cpp and transformers, compared token by token.

    python bench/greedy_vs_llamacpp.py [-m model.gguf] [-n 24] [--set completion|chat|both]
        [--transformers] [-p "prompt" ...]

llama.cpp runs through llama-cpp-python (`pip install llama-cpp-python`) twice: with flash
attention off (llama-cpp-python's default) and on (the default of llama.cpp's own CLI tools on
a CPU). Both runs get the token ids pyllm made, so only the arithmetic differs. With
`--transformers` the exact model (transformers dequantizing the same GGUF, F32) runs as well.

Each run stops at an end-of-generation token (as a real reply does) or after -n tokens. For
every prompt the script prints how many leading greedy tokens each pair shares ("all" when the
two replies are identical), and at the first point where pyllm and llama.cpp part, the exact
model's logit margin between the two choices. The summary counts prompts whose replies agree
for at least 16 tokens, or entirely. The control column,
llama.cpp with flash attention on against off, shows how often llama.cpp agrees with itself
when only its attention arithmetic changes. A tool for people, not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

# Ordinary English sentence starts, continued as plain text.
COMPLETION_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "The three primary colours are",
    "To make a cup of tea, first",
    "The largest planet in our solar system is",
    "Water boils at a temperature of",
    "The best way to learn a new language is",
    "Photosynthesis is the process by which",
    "My favourite food is",
    "The history of the Roman Empire",
    "Python is a programming language that",
    "The sun rises in the east and",
    "A healthy breakfast should include",
    "The theory of relativity was developed by",
    "In the morning, I like to",
    "The main causes of climate change are",
    "Dogs are popular pets because",
    "The first man to walk on the moon was",
    "To write a good essay, you should",
    "The internet has changed the way we",
]

# Ordinary user questions, sent through the model's chat template.
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "What are the three primary colours?",
    "How do I make a cup of tea?",
    "What is the largest planet in our solar system?",
    "At what temperature does water boil?",
    "What is the best way to learn a new language?",
    "Explain photosynthesis in simple terms.",
    "Give me a recipe for pancakes.",
    "Tell me about the history of the Roman Empire.",
    "What is Python used for?",
    "Why does the sun rise in the east?",
    "What should a healthy breakfast include?",
    "Who developed the theory of relativity?",
    "Suggest a morning routine.",
    "What are the main causes of climate change?",
    "Why are dogs popular pets?",
    "Who was the first man to walk on the moon?",
    "How do I write a good essay?",
    "How has the internet changed communication?",
]

AGREE_TOKENS = 16

class Runtime:
    """One way to run the model: ``start`` evaluates a prompt from an empty context, ``step``
    one more token; ``argmax`` is the greedy choice after the last evaluated token."""

    def start(self, ids: list[int]) -> None:
        raise NotImplementedError

    def step(self, token: int) -> None:
        raise NotImplementedError

    def argmax(self) -> int:
        raise NotImplementedError

    def greedy(self, ids: list[int], n: int, is_end: Callable[[int], bool]) -> list[int]:
        """Greedy decoding of up to ``n`` tokens, stopping after an end-of-generation token."""
        self.start(ids)
        out: list[int] = []
        while len(out) < n:
            out.append(self.argmax())
            if is_end(out[-1]):
                break
            self.step(out[-1])
        return out


class PyllmRuntime(Runtime):
    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.logits = np.zeros(0)

    def start(self, ids: list[int]) -> None:
        self.logits = self.llm.eval_prompt(ids)  # clears the context first

    def step(self, token: int) -> None:
        self.logits = self.llm.eval([token])

    def argmax(self) -> int:
        return int(np.argmax(self.logits))


class LlamaCppRuntime(Runtime):
    def __init__(self, model: str, flash_attn: bool, threads: int) -> None:
        import llama_cpp  # noqa: PLC0415 - optional

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=model, n_ctx=512, n_threads=threads,
                                   n_threads_batch=threads, flash_attn=flash_attn, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def start(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def step(self, token: int) -> None:
        self.llm.eval([token])

    def argmax(self) -> int:
        # the last evaluated row, read directly (Llama.scores keeps rows only with logits_all)
        ptr = self.lib.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))


class TransformersRuntime(Runtime):
    """The exact model: transformers dequantizes the same GGUF and computes in F32."""

    def __init__(self, model_path: str) -> None:
        import torch  # noqa: PLC0415 - optional
        import transformers  # noqa: PLC0415 - optional

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        directory, name = os.path.split(os.path.abspath(model_path))
        self.torch = torch
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=torch.float32)
        self.past: Any = None
        self.logits: Any = None

    def _run(self, ids: list[int], past: Any) -> None:
        with self.torch.no_grad():
            r = self.hf(self.torch.tensor([ids]), past_key_values=past, use_cache=True)
        self.past, self.logits = r.past_key_values, r.logits[0, -1]

    def start(self, ids: list[int]) -> None:
        self._run(ids, None)

    def step(self, token: int) -> None:
        self._run([token], self.past)

    def argmax(self) -> int:
        return int(self.logits.argmax())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", help="GGUF file (default: pyllm's default model)")
    ap.add_argument("-n", type=int, default=24, help="greedy tokens per prompt")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--set", choices=("completion", "chat", "both"), default="both")
    ap.add_argument("-p", "--prompt", action="append", help="completion prompt (repeatable)")
    ap.add_argument("--transformers", action="store_true",
                    help="also run the exact model through transformers (needs torch)")
    args = ap.parse_args()

    from pyllm.runtime.generation import chat_prompt
    from pyllm.runtime.llm import LLM, common_prefix

    llm = LLM(args.model, n_ctx=512, n_threads=args.threads)
    model = str(llm.model_path)
    runtimes: dict[str, Runtime] = {
        "pyllm": PyllmRuntime(llm),
        "llama.cpp": LlamaCppRuntime(model, False, args.threads),
        "llama.cpp fa": LlamaCppRuntime(model, True, args.threads),
    }
    if args.transformers:
        runtimes["exact"] = TransformersRuntime(model)

    cases: list[tuple[str, str, list[int]]] = []
    if args.prompt or args.set in ("completion", "both"):
        for p in args.prompt or COMPLETION_PROMPTS:
            cases.append(("completion", p, llm.tokenize(p)))
    if not args.prompt and args.set in ("chat", "both"):
        for p in CHAT_PROMPTS:
            ids, _ = chat_prompt(llm, [{"role": "user", "content": p}], None)
            cases.append(("chat", p, list(ids)))

    pairs = [("pyllm", "llama.cpp"), ("pyllm", "llama.cpp fa"), ("llama.cpp fa", "llama.cpp")]
    if "exact" in runtimes:
        pairs.append(("pyllm", "exact"))
    header = " | ".join(f"{a} ~ {b}" for a, b in pairs)
    counts: dict[tuple[str, str, str], int] = {}
    totals: dict[str, int] = {}
    print(f"leading greedy tokens in common (of {args.n}; 'all': identical replies). margin: "
          "the exact model's logit gap between pyllm's and llama.cpp's token where they part")
    print(f"set | {header} | margin | prompt")
    for kind, prompt, ids in cases:
        outs = {name: rt.greedy(ids, args.n, llm.tokenizer.is_eog)
                for name, rt in runtimes.items()}
        same = {pair: common_prefix(outs[pair[0]], outs[pair[1]]) for pair in pairs}
        identical = {pair: outs[pair[0]] == outs[pair[1]] for pair in pairs}
        margin = ""
        cut = same[("pyllm", "llama.cpp")]
        if not identical[("pyllm", "llama.cpp")]:
            logits = llm.eval_prompt(ids + outs["pyllm"][:cut])  # pyllm follows the exact model
            ours, theirs = outs["pyllm"][cut], outs["llama.cpp"][cut]
            margin = f"{float(logits[ours] - logits[theirs]):.3f}"
        totals[kind] = totals.get(kind, 0) + 1
        for pair, n in same.items():
            if n >= AGREE_TOKENS or identical[pair]:
                counts[(kind, *pair)] = counts.get((kind, *pair), 0) + 1
        cells = " | ".join("all" if identical[p] else f"{same[p]:3d}" for p in pairs)
        print(f"{kind} | {cells} | {margin} | {prompt!r}", flush=True)
    print(f"\nprompts agreeing for >= {AGREE_TOKENS} tokens (or entirely)")
    for kind, total in totals.items():
        cells = ", ".join(f"{a} ~ {b}: {counts.get((kind, a, b), 0)}/{total}" for a, b in pairs)
        print(f"  {kind}: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
