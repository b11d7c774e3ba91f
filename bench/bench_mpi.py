#!/usr/bin/env python3
"""The layer pipeline over MPI on one machine: per-rank peak memory, tokens/s, and the server's
aggregate throughput with several streams, at N = 1, 2, 3 ranks.

    python bench/bench_mpi.py -m l7b-q4_0.gguf [--ranks 1 2 3] [-p 64] [-n 16] [-r 2]
                              [--server-model tl-q4_0.gguf] [--streams 4] [--tokens 48]
                              [--ppl-model tl-q4_0.gguf --ppl-text README.md]

Per N: ``pyllm bench`` (N = 1, the whole model in one process at each thread count) or
``mpirun -np N pyllm bench --mpi -t 1`` (one thread per rank), whose JSON gives pp/tg tokens/s
and every rank's peak RSS. With ``--server-model``: ``pyllm serve`` with ``--parallel
STREAMS`` (N = 1) and ``mpirun -np 2 pyllm serve --mpi`` (N = 2), STREAMS concurrent greedy
completions of ``--tokens`` tokens each, after one warm-up request; the aggregate is the
tokens of all streams over the wall time of the round. With ``--ppl-model``: ``pyllm
perplexity -c 256 -b 64`` over the text (chunks of 64 tokens pipelined), its own time. A tool
for people, not a test.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _mpirun(n: int) -> list[str]:
    exe = shutil.which("mpirun")
    if exe is None:
        sys.exit("error: mpirun not found (apt install openmpi-bin libopenmpi-dev)")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return [exe, *root, "--oversubscribe", "-np", str(n)]


def _pyllm(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyllm", *args]


def bench(model: str, ranks: int, threads: int, p: int, n: int, reps: int) -> list[dict[str, Any]]:
    args = ["bench", "-m", model, "-p", str(p), "-n", str(n), "-r", str(reps), "-t",
            str(threads), "-o", "json"]
    cmd = _pyllm(*args) if ranks == 1 else [*_mpirun(ranks), *_pyllm(*args, "--mpi")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         cwd=tempfile.gettempdir()).stdout
    return list(json.loads(out[out.index("["):]))


def serve_throughput(model: str, ranks: int, threads: int, streams: int, tokens: int) -> float:
    args = ["serve", "-m", model, "--port", "0", "-t", str(threads), "--parallel", str(streams),
            "-c", "1024"]
    cmd = _pyllm(*args) if ranks == 1 else [*_mpirun(ranks), *_pyllm(*args, "--mpi")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tempfile.gettempdir(), start_new_session=True)
    try:
        import httpx

        url = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if m := re.search(r"listening on (http://\S+)", line):
                url = m.group(1)
            if "pyllm: serving" in line:
                break
        assert url, "the server did not start"

        def one(k: int) -> int:
            r = httpx.post(f"{url}/v1/completions", timeout=600, json={
                "prompt": f"Story number {k}:", "max_tokens": tokens, "temperature": 0})
            return int(r.json()["usage"]["completion_tokens"])

        one(0)  # warm-up
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(streams) as pool:
            total = sum(pool.map(one, range(1, streams + 1)))
        return total / (time.perf_counter() - t0)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def perplexity_seconds(model: str, text: str, ranks: int, threads: int) -> tuple[float, str]:
    args = ["perplexity", "-m", model, "-f", text, "-c", "256", "-b", "64", "-t", str(threads)]
    cmd = _pyllm(*args) if ranks == 1 else [*_mpirun(ranks), *_pyllm(*args, "--mpi")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         cwd=tempfile.gettempdir()).stdout
    m = re.search(r"PPL = (\S+) .*, ([0-9.]+) s\)", out)
    assert m, out
    return float(m.group(2)), m.group(1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("-p", type=int, default=64)
    ap.add_argument("-n", type=int, default=16)
    ap.add_argument("-r", type=int, default=2)
    ap.add_argument("--server-model", default=None)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--ppl-model", default=None)
    ap.add_argument("--ppl-text", default=None)
    a = ap.parse_args()
    size_mib = Path(a.model).stat().st_size / (1 << 20)
    print(f"model {Path(a.model).name}: {size_mib:.0f} MiB; {os.cpu_count()} CPUs\n")
    print("| ranks | threads per rank | pp t/s | tg t/s | peak RSS per rank MiB | largest / file |")
    print("| ---: | ---: | ---: | ---: | --- | ---: |")
    for ranks in a.ranks:
        for threads in ([1, os.cpu_count() or 1] if ranks == 1 else [1]):
            rows = bench(a.model, ranks, threads, a.p, a.n, a.r)
            speed = {r["test"][:2]: r["tokens_per_s"] for r in rows}
            rss = rows[-1]["rank_rss_mib"] or [rows[-1]["peak_rss_mib"]]
            print(f"| {ranks} | {threads} | {speed.get('pp', 0):.2f} | {speed.get('tg', 0):.2f} |"
                  f" {' / '.join(f'{x:.0f}' for x in rss)} | {max(rss) / size_mib:.2f} |",
                  flush=True)
    cpus = os.cpu_count() or 1
    if a.ppl_model and a.ppl_text:
        print(f"\nperplexity, -c 256 -b 64, {Path(a.ppl_model).name}:\n")
        print("| ranks | threads per rank | seconds | PPL |")
        print("| ---: | ---: | ---: | ---: |")
        for ranks, threads in ((1, cpus), (1, 1), *((r, 1) for r in a.ranks if r > 1)):
            secs, ppl = perplexity_seconds(a.ppl_model, a.ppl_text, ranks, threads)
            print(f"| {ranks} | {threads} | {secs:.1f} | {ppl} |", flush=True)
    if a.server_model:
        print(f"\nserver, {a.streams} streams x {a.tokens} tokens, "
              f"{Path(a.server_model).name}:\n")
        print("| ranks | threads per rank | aggregate t/s |")
        print("| ---: | ---: | ---: |")
        for ranks, threads in ((1, cpus), (1, 1), (2, 1)):
            tps = serve_throughput(a.server_model, ranks, threads, a.streams, a.tokens)
            print(f"| {ranks} | {threads} | {tps:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
