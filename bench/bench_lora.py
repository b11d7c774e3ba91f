#!/usr/bin/env python3
"""Decode and prefill with a LoRA adapter applied at run time vs the base alone.

    python bench/bench_lora.py [-m model.gguf] [-r 16] [-n 64] [-p 256] [-t THREADS] [--rounds 5]

The adapter is random, rank -r, F16 (``--type f32`` / ``q8_0`` for others), on all seven
matrices of every block (what PEFT's ``target_modules="all-linear"`` trains), in a temp folder.
Decode (-n tokens after a short prompt, end-of-generation banned so every run makes -n tokens) and
prefill (-p tokens) alternate base / adapter within each round; medians and the per-round
ratios are reported. A tool for people, not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="GGUF model (default: the default model)")
    ap.add_argument("-r", "--rank", type=int, default=16)
    ap.add_argument("-n", type=int, default=64, help="decode tokens (64)")
    ap.add_argument("-p", type=int, default=256, help="prefill tokens (256)")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--type", choices=["f16", "f32", "q8_0"], default="f16",
                    help="the adapter's tensor type (f16, convert-lora's default; q8_0: A in "
                    "Q8_0 where its rows are whole blocks, B in F16)")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pyllm.runtime.default_model import resolve_model_path
    from pyllm.runtime.llm import LLM
    from tests.test_lora import write_random_adapter

    model = Path(args.model) if args.model else resolve_model_path(None)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = write_random_adapter(Path(tmp) / "lora.gguf", model, rank=args.rank,
                                       dtype={"f16": np.float16, "f32": np.float32}.get(
                                           args.type, args.type))
        base = LLM(model, n_ctx=args.p + args.n + 16, n_threads=args.threads)
        lora = LLM(model, n_ctx=args.p + args.n + 16, n_threads=args.threads,
                   lora=[adapter])
        eog = {t: -1e30 for t in base.tokenizer.eot_ids} | (
            {base.tokenizer.eos_id: -1e30} if base.tokenizer.eos_id is not None else {})
        rng = np.random.default_rng(0)
        prompt = rng.integers(100, base.n_vocab - 100, args.p).tolist()
        rates: dict[str, list[float]] = {"tg base": [], "tg lora": [], "pp base": [],
                                         "pp lora": []}
        for _ in range(args.rounds):
            for name, llm in (("base", base), ("lora", lora)):
                llm.reset()
                t0 = time.perf_counter()
                llm.eval(prompt)
                rates[f"pp {name}"].append(args.p / (time.perf_counter() - t0))
                llm.reset()
                llm.eval(prompt[:8])
                t0 = time.perf_counter()
                llm.generate(prompt[:8], max_tokens=args.n, temperature=0, logit_bias=eog)
                rates[f"tg {name}"].append(args.n / (time.perf_counter() - t0))
        print(f"{model.name}, {args.type} rank {args.rank} on 7 matrices x "
              f"{base.hparams.n_layer} layers, "
              f"{base.n_threads} threads, {args.rounds} rounds\n")
        print("| test | base t/s | with adapter t/s | adapter / base | per round |\n"
              "| --- | ---: | ---: | ---: | --- |")
        for test in ("pp", "tg"):
            b, a = rates[f"{test} base"], rates[f"{test} lora"]
            ratios = [round(y / x, 3) for x, y in zip(b, a, strict=True)]
            label = f"{test}{args.p if test == 'pp' else args.n}"
            print(f"| {label} | {statistics.median(b):.1f} | {statistics.median(a):.1f} | "
                  f"{statistics.median(ratios):.3f} | {' '.join(map(str, ratios))} |")
        base.close()
        lora.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
