#!/usr/bin/env python3
"""Aggregate generation speed of 4 concurrent streams vs 1, on the server's batching engine and
through HTTP (the openai client against an in-process uvicorn).

    python bench/bench_server.py [-m model.gguf] [-n 64] [-r 3] [-t THREADS] [-o md|json]

Every stream is greedy with end-of-generation banned (logit_bias), so each makes exactly -n
tokens. A shared machine's load swings within seconds, so 1-stream and 4-stream runs alternate,
-r pairs, and the median of the pairs' ratios is reported (wall clock and CPU time of this
process). Needs ``pip install "pyllm[server]" openai``.

A tool for people, not part of the test suite: the tests check what the server does, this
measures how fast it does it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "def fib(n):"]


def engine_rate(engine: Any, llm: Any, prompts: list[str], n: int,
                bias: dict[int, float]) -> tuple[float, float]:
    """Run ``prompts`` together on the engine; generated tokens per wall-clock second and per
    CPU second of this process."""
    from pyllm.runtime.sampling import SamplingParams
    from pyllm.server.engine import DoneEvent, Request, TokenEvent

    done = threading.Event()
    left = [len(prompts)]
    counts = [0]

    def on_event(ev: Any) -> None:
        if isinstance(ev, TokenEvent) and ev.token is not None:
            counts[0] += 1
        elif isinstance(ev, DoneEvent):
            left[0] -= 1
            if left[0] == 0:
                done.set()

    params = SamplingParams(temperature=0, logit_bias=bias)
    t0, c0 = time.perf_counter(), time.process_time()
    for p in prompts:
        engine.submit(Request(llm.tokenize(p), params, on_event, max_tokens=n))
    if not done.wait(600):
        raise SystemExit("error: the engine did not finish within 600 s")
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    if counts[0] != n * len(prompts):
        raise SystemExit(f"error: {counts[0]} tokens generated, expected {n * len(prompts)}")
    return counts[0] / dt, counts[0] / dc


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """The app under uvicorn on a thread, on a free loopback port; yields its base URL."""
    from pyllm.cli.serve import bind_socket, make_server

    sock = bind_socket("127.0.0.1", 0)
    server = make_server(app, shutdown_timeout=5)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise SystemExit("error: uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


def http_rates(url: str, n: int, bias: dict[int, float]) -> tuple[float, float]:
    """Tokens per second of 1 stream, then of 4 concurrent streams, through HTTP."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=2, timeout=600)

    def stream(prompt: str) -> int:
        chunks = client.completions.create(model="m", prompt=prompt, max_tokens=n,
                                           temperature=0, stream=True,
                                           logit_bias={str(t): b for t, b in bias.items()},
                                           stream_options={"include_usage": True})
        return int(list(chunks)[-1].usage.completion_tokens)

    t0 = time.perf_counter()
    one = stream(PROMPTS[1]) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        total = sum(pool.map(stream, PROMPTS))
    return one, total / (time.perf_counter() - t0)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from pyllm.runtime.default_model import resolve_model_path
    from pyllm.runtime.llm import LLM
    from pyllm.server.app import ServerConfig, create_app
    from pyllm.server.engine import Engine

    path = resolve_model_path(args.model, quiet=False)
    with LLM(path, n_ctx=64, n_threads=args.threads) as llm:
        engine = Engine(llm, n_parallel=4, n_ctx=args.tokens + 64)
        try:
            bias = {t: -100.0 for t in engine.stop_ids}
            pairs = []
            for _ in range(args.rounds):
                one = engine_rate(engine, llm, PROMPTS[1:2], args.tokens, bias)
                four = engine_rate(engine, llm, PROMPTS, args.tokens, bias)
                pairs.append((one, four))
            with serve(create_app(ServerConfig(), engine=engine)) as url:
                http_one, http_four = http_rates(url, args.tokens, bias)
        finally:
            engine.stop()
        threads = llm.n_threads
    return {
        "model": os.path.basename(str(path)), "tokens_per_stream": args.tokens,
        "engine_speedup_wall": round(statistics.median(f[0] / o[0] for o, f in pairs), 2),
        "engine_speedup_cpu": round(statistics.median(f[1] / o[1] for o, f in pairs), 2),
        "engine_pairs_tok_s": [[round(o[0], 1), round(f[0], 1)] for o, f in pairs],
        "http_1_stream_tok_s": round(http_one, 1), "http_4_streams_tok_s": round(http_four, 1),
        "http_speedup": round(http_four / http_one, 2),
        "threads": threads, "cpus": os.cpu_count(), "loadavg_1min": round(os.getloadavg()[0], 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="GGUF file (default: the default model)")
    ap.add_argument("-n", "--tokens", type=int, default=64, help="tokens per stream (64)")
    ap.add_argument("-r", "--rounds", type=int, default=3, help="1-vs-4 pairs (3)")
    ap.add_argument("-t", "--threads", type=int, default=None, help="threads (default: pyllm's)")
    ap.add_argument("-o", "--output", choices=("md", "json"), default="md")
    args = ap.parse_args()
    if args.tokens <= 0 or args.rounds <= 0:
        ap.error("-n and -r must be positive")
    record = measure(args)
    if args.output == "json":
        print(json.dumps(record, indent=2))
        return 0
    print(f"{record['model']}, {record['threads']} threads, {args.tokens} tokens per stream, "
          f"load {record['loadavg_1min']}")
    print("| | 1 stream tok/s | 4 streams tok/s | 4 vs 1 |")
    print("|---|---:|---:|---:|")
    for i, (one, four) in enumerate(record["engine_pairs_tok_s"]):
        print(f"| engine, pair {i + 1} | {one} | {four} | {four / one:.2f}x |")
    print(f"| engine, median ratio (wall / CPU) | | | {record['engine_speedup_wall']}x / "
          f"{record['engine_speedup_cpu']}x |")
    print(f"| HTTP (openai client) | {record['http_1_stream_tok_s']} | "
          f"{record['http_4_streams_tok_s']} | {record['http_speedup']}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
