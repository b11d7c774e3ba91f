#!/usr/bin/env python3
"""Cold start side by side: a fresh `pyllm run` process against llama.cpp's, to the first token.

    python bench/cold_start.py -m model.gguf [-m other.gguf] -t 2 [-r 7]
        [--llama-simple /path/to/llama-simple] [--llama-completion /path/to/llama-completion]
        [--pyllm "pyllm"] [-p PROMPT] [--first-run]

Each round starts every runtime once on every model, in alternating order (so that a shared
machine's swings hit all alike), as a new process generating one token greedily. Measured per
process: the time from spawn to the arrival of the first generated token on stdout (the chunk
holding the last non-blank byte of the output: both tools print the prompt, then the token),
the time to exit, and the peak RSS (wait4's ru_maxrss). One untimed run of each comes first,
so that the model file is in the page cache (and pyllm's repack cache is written, see
pyllm/runtime/repack_cache.py); `--no-warm` leaves that out. `--first-run` adds a row for
pyllm's first run of a file: each such run gets an empty repack cache folder, so it repacks
in fresh memory and writes the cache (its exit waits for that write). The table gives medians
and ranges.

`llama-simple` always uses llama.cpp's default thread count (it has no flag); `llama-completion`
is given `-t` like pyllm. A tool for people, not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass

PROMPT = "The history of the city begins with a small settlement by the river, where"


@dataclass
class Sample:
    first_token_s: float
    exit_s: float
    peak_rss_mb: float


def run_once(cmd: list[str], fresh_cache: bool = False) -> Sample:
    env = None
    if fresh_cache:
        env = {**os.environ, "PYLLM_REPACK_CACHE": tempfile.mkdtemp(prefix="pyllm-rpk-")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
                            env=env)
    assert proc.stdout is not None
    chunks: list[tuple[float, bytes]] = []
    while True:
        data = os.read(proc.stdout.fileno(), 1 << 16)
        if not data:
            break
        chunks.append((time.perf_counter() - t0, data))
    _, status, usage = os.wait4(proc.pid, 0)
    t_exit = time.perf_counter() - t0
    if env is not None:
        shutil.rmtree(env["PYLLM_REPACK_CACHE"], ignore_errors=True)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: {shlex.join(cmd)} exited with status {status}")
    first = None
    for t, data in chunks:  # the chunk with the last non-blank byte: the generated token
        if data.strip():
            first = t
    if first is None:
        raise SystemExit(f"error: {shlex.join(cmd)} printed nothing")
    return Sample(first, t_exit, usage.ru_maxrss / 1024)


def commands(args: argparse.Namespace, model: str) -> dict[str, list[str]]:
    out = {"pyllm run": [*shlex.split(args.pyllm), "run", "-m", model, "-p", args.prompt,
                         "-n", "1", "--temp", "0", "-t", str(args.threads)]}
    if args.llama_simple:
        out["llama-simple"] = [args.llama_simple, "-m", model, "-n", "1", args.prompt]
    if args.llama_completion:
        out["llama-completion"] = [args.llama_completion, "-m", model, "-p", args.prompt,
                                   "-n", "1", "-t", str(args.threads), "--temp", "0",
                                   "-no-cnv", "--no-display-prompt"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", action="append", required=True)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--rounds", type=int, default=7)
    ap.add_argument("-p", "--prompt", default=PROMPT)
    ap.add_argument("--pyllm", default="pyllm", help="the command that runs pyllm")
    ap.add_argument("--llama-simple")
    ap.add_argument("--llama-completion")
    ap.add_argument("--no-warm", action="store_true")
    ap.add_argument("--first-run", action="store_true")
    args = ap.parse_args()
    results: dict[tuple[str, str], list[Sample]] = {}
    for model in args.model:
        cmds = commands(args, model)
        if not args.no_warm:
            for cmd in cmds.values():
                run_once(cmd)
        if args.first_run:
            cmds["pyllm run, first run of the file"] = cmds["pyllm run"]
        for r in range(args.rounds):
            names = list(cmds)
            if r % 2:
                names.reverse()
            for name in names:
                sample = run_once(cmds[name], fresh_cache=name.endswith("first run of the file"))
                results.setdefault((model, name), []).append(sample)
    print("| model | runtime | first token s (median, range) | exit s | peak RSS MB |")
    print("| --- | --- | ---: | ---: | ---: |")
    for (model, name), samples in results.items():
        ft = [s.first_token_s for s in samples]
        ex = [s.exit_s for s in samples]
        rss = [s.peak_rss_mb for s in samples]
        print(f"| {os.path.basename(model)} | {name} | {statistics.median(ft):.3f} "
              f"({min(ft):.3f}-{max(ft):.3f}) | {statistics.median(ex):.3f} | "
              f"{statistics.median(rss):,.0f} |")


if __name__ == "__main__":
    main()
