#!/usr/bin/env python3
"""Side-by-side throughput of pyllm and llama.cpp on the same GGUF files and thread counts.

    python bench/compare_llamacpp.py -m model.gguf [-m other.gguf:128:32] -t 1 -t 2 [-p 512]
        [-n 128] [--llama-bench /path/to/llama-bench] [-r 3] [-o md|json]

`-m FILE:P:N` gives one model its own prompt and generation lengths (e.g. shorter runs for a
7B file) instead of -p / -n.

llama.cpp is measured with its own `llama-bench` binary when --llama-bench is given (a build of
llama.cpp, e.g. the one vendored in the llama-cpp-python sdist), else through the `llama_cpp`
Python package (llama-cpp-python, which builds llama.cpp when pip installs it). pyllm is measured
with `pyllm.tools.throughput`. The two alternate, one repetition each per round (-r rounds), so that
a shared machine's swings in load and memory bandwidth hit both alike; the table shows the median
tokens/s of each and the median of the per-round ratios pyllm / llama.cpp.

A tool for people, not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def llamacpp_bench_binary(binary: str, model: str, threads: int, n_prompt: int, n_gen: int,
                          reps: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for label, p, n in (("pp", n_prompt, 0), ("tg", 0, n_gen)):
        if (p or n) == 0:
            continue
        proc = subprocess.run([binary, "-m", model, "-t", str(threads), "-p", str(p), "-n", str(n),
                               "-r", str(reps), "-o", "json"], capture_output=True, text=True,
                              check=True)
        rows = json.loads(proc.stdout)
        out[label] = float(rows[0]["avg_ts"])
    return out


def llamacpp_bench_python(model: str, threads: int, n_prompt: int, n_gen: int,
                          reps: int) -> dict[str, float]:
    import llama_cpp  # noqa: PLC0415 - optional

    llm = llama_cpp.Llama(model_path=model, n_ctx=max(n_prompt, n_gen) + 8, n_threads=threads,
                          n_threads_batch=threads, verbose=False,
                          # llm.scores keeps n_batch rows: the tg loop reads row n_tokens - 1
                          n_batch=max(n_prompt, n_gen + 1))
    rng = np.random.default_rng(0)
    out: dict[str, float] = {}
    if n_prompt:
        rates = []
        for rep in range(reps + 1):
            toks = [int(t) for t in rng.integers(0, llm.n_vocab(), n_prompt)]
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(toks)
            if rep:
                rates.append(n_prompt / (time.perf_counter() - t0))
        out["pp"] = statistics.fmean(rates)
    if n_gen:
        rates = []
        for rep in range(reps + 1):
            llm.reset()
            llm.eval([1])
            t0 = time.perf_counter()
            for _ in range(n_gen):
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            if rep:
                rates.append(n_gen / (time.perf_counter() - t0))
        out["tg"] = statistics.fmean(rates)
    return out


def model_spec(spec: str, n_prompt: int, n_gen: int) -> tuple[str, int, int]:
    """``FILE`` or ``FILE:P:N`` -> (file, prompt length, generation length)."""
    parts = spec.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return parts[0], int(parts[1]), int(parts[2])
    return spec, n_prompt, n_gen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", action="append", required=True)
    ap.add_argument("-t", "--threads", type=int, action="append")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--llama-bench", help="path of llama.cpp's llama-bench binary")
    ap.add_argument("-o", "--output", choices=("md", "json"), default="md")
    args = ap.parse_args()

    from pyllm.tools.throughput import bench_model

    rows = []
    for spec in args.model:
        model, n_prompt, n_gen = model_spec(spec, args.n_prompt, args.n_gen)
        for threads in args.threads or [2]:
            rounds: list[tuple[dict[str, float], dict[str, float]]] = []
            for _ in range(max(1, args.repetitions)):
                ours = {r.test[:2]: r.tokens_per_s for r in
                        bench_model(model, n_prompt, n_gen, threads, 1)}
                if args.llama_bench:
                    theirs = llamacpp_bench_binary(args.llama_bench, model, threads,
                                                   n_prompt, n_gen, 1)
                else:
                    theirs = llamacpp_bench_python(model, threads, n_prompt, n_gen, 1)
                rounds.append((ours, theirs))
            for kind, n in (("pp", n_prompt), ("tg", n_gen)):
                both = [(o[kind], t[kind]) for o, t in rounds if kind in o and kind in t]
                if both:
                    rows.append({"model": Path(model).name, "threads": threads,
                                 "test": f"{kind}{n}",
                                 "pyllm": statistics.median(o for o, _ in both),
                                 "llama.cpp": statistics.median(t for _, t in both),
                                 "ratio": statistics.median(o / t for o, t in both),
                                 "ratios": [round(o / t, 2) for o, t in both]})
    if args.output == "json":
        print(json.dumps(rows, indent=2))
    else:
        print("| model | threads | test | pyllm t/s | llama.cpp t/s | ratio | per round |")
        print("| --- | ---: | --- | ---: | ---: | ---: | --- |")
        for r in rows:
            print(f"| {r['model']} | {r['threads']} | {r['test']} | {r['pyllm']:.2f} | "
                  f"{r['llama.cpp']:.2f} | {r['ratio']:.2f} | "
                  f"{' '.join(str(x) for x in r['ratios'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
