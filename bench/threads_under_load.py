"""Decode speed with a busy neighbour, and with more threads than CPUs.

For each thread count, decode tokens/s is measured quiet and with a busy loop pinned to one of
the process's CPUs (``taskset -c CPU python3 -c "while 1: pass"``), alternating quiet and loaded
rounds because this VM's speed swings within minutes; the loaded/quiet ratio reported is the
median of the per-round ratios. Thread counts go straight to the C++ context, so a count above
the CPUs (oversubscription) is measured as asked, without the Python-side cap.

    python bench/threads_under_load.py -t 2 -t 16 -n 64 -r 5

``--core A.so --core B.so`` compares two builds of the extension module (e.g. a copy of
``pyllm/_core*.so`` from before a change and the current one): each round then measures every
build in turn, each in its own process.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _load_core(path: str | None) -> None:
    """Makes `path` (a build of pyllm._core) the module pyllm uses in this process."""
    if path is None:
        return
    spec = importlib.util.spec_from_file_location("pyllm._core", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"error: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["pyllm._core"] = module


def _decode_tps(ctx: object, n_vocab: int, n: int) -> float:
    ctx.truncate(0)
    logits = ctx.decode(np.array([1], dtype=np.int32), "last")
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(logits)) % n_vocab
        logits = ctx.decode(np.array([tok], dtype=np.int32), "last")
    return n / (time.perf_counter() - t0)


def _busy_loop(cpu: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", "while 1: pass"])


def _measure(model_path: str | None, nt: int, n_gen: int, loaded: bool, cpu: int) -> float:
    """Decode tokens/s on nt threads (warm), with or without the busy loop."""
    from pyllm import _core as core
    from pyllm.runtime.llm import LLM

    llm = LLM(model_path, n_ctx=n_gen + 16, n_threads=1)
    try:
        model = llm._model  # noqa: SLF001 - the loaded weights, for a context of nt threads
        ctx = core.Context(model, n_ctx=n_gen + 16, n_batch=1, n_threads=nt)
        _decode_tps(ctx, llm.n_vocab, n_gen)  # warm-up
        busy = _busy_loop(cpu) if loaded else None
        try:
            if busy is not None:
                time.sleep(0.3)  # let the loop start spinning
            return _decode_tps(ctx, llm.n_vocab, n_gen)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    finally:
        llm.close()


def _one(args: argparse.Namespace, core_path: str | None, nt: int, loaded: bool,
         cpu: int) -> float:
    """One measurement in a fresh process (so that --core can pick the build)."""
    cmd = [sys.executable, __file__, "--child", f"{nt},{int(loaded)},{cpu}", "-n",
           str(args.n_gen)]
    if args.model:
        cmd += ["-m", args.model]
    if core_path:
        cmd += ["--core", core_path]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None, help="GGUF model (default: the default model)")
    ap.add_argument("-t", "--threads", type=int, action="append", help="thread counts (2)")
    ap.add_argument("-n", "--n-gen", type=int, default=64, help="tokens per measurement")
    ap.add_argument("-r", "--rounds", type=int, default=5, help="quiet/loaded rounds")
    ap.add_argument("--cpu", type=int, default=None,
                    help="CPU for the busy loop (default: the last one this process may use)")
    ap.add_argument("--core", action="append", default=None,
                    help="a build of pyllm._core to measure (repeatable; default: the installed)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _load_core(args.core[0] if args.core else None)
        nt, loaded, cpu = (int(v) for v in args.child.split(","))
        print(_measure(args.model, nt, args.n_gen, bool(loaded), cpu))
        return 0
    threads = args.threads or [2]
    cores: list[str | None] = list(args.core) if args.core else [None]
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    print(f"model {args.model or 'default'}, busy loop on CPU {cpu}, {args.n_gen} tokens, "
          f"{args.rounds} rounds")
    print("| build | threads | quiet t/s | loaded t/s | loaded/quiet | per round |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for nt in threads:
        quiet: dict[str | None, list[float]] = {c: [] for c in cores}
        loaded: dict[str | None, list[float]] = {c: [] for c in cores}
        for r in range(args.rounds):
            for is_loaded in ((False, True) if r % 2 == 0 else (True, False)):
                for c in (cores if r % 2 == 0 else cores[::-1]):
                    (loaded if is_loaded else quiet)[c].append(
                        _one(args, c, nt, is_loaded, cpu))
        for c in cores:
            ratios = [b / a for a, b in zip(quiet[c], loaded[c], strict=True)]
            name = Path(c).name if c else "installed"
            print(f"| {name} | {nt} | {statistics.median(quiet[c]):.1f} | "
                  f"{statistics.median(loaded[c]):.1f} | {statistics.median(ratios):.2f} | "
                  f"{' '.join(f'{x:.2f}' for x in ratios)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
