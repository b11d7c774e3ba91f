"""Throughput measurement like llama-bench: prompt processing (pp) and text generation (tg).

pp N: evaluate N tokens in one call from an empty context. tg N: generate N tokens one at a time
after a one-token context (greedy argmax of the logits, so sampling cost stays out of it). Each
test runs once as a warm-up (excluded), then ``reps`` timed times; results are mean +/- stdev of
tokens/s. Load time and the process's peak RSS are reported too.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pyllm.runtime.llm import LLM
from pyllm.runtime.sysinfo import peak_rss_bytes

if TYPE_CHECKING:
    from pyllm.runtime.mpi import Pipeline


@dataclass
class BenchResult:
    model: str
    size_bytes: int
    n_params: int
    test: str  # "pp512" / "tg128"
    backend: str  # where the layers ran: "cpu", "opencl:0", "cpu+opencl:0" (llama-bench's column)
    threads: int  # the CPU's threads (0 when no layer ran on the CPU)
    tokens_per_s: float
    stdev: float
    reps: int
    load_s: float
    peak_rss_mib: float  # this process's (rank 0's in a pipeline)
    rank_rss_mib: tuple[float, ...] = ()  # a pipeline's ranks', in rank order

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def peak_rss_mib() -> float:
    return peak_rss_bytes() / (1 << 20)


def _tokens(n: int, n_vocab: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, n_vocab, n)]


def _time_pp(llm: LLM, tokens: list[int]) -> float:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    return time.perf_counter() - t0


def _time_tg(llm: LLM, first: int, n: int) -> float:
    llm.reset()
    logits = llm.eval([first])
    t0 = time.perf_counter()
    for _ in range(n):
        logits = llm.eval([int(np.argmax(logits))])
    return time.perf_counter() - t0


def bench_model(path: str | os.PathLike[str] | None, n_prompt: int, n_gen: int,
                threads: int | None, reps: int, n_gpu_layers: int = 0,
                device: str | None = None, pipeline: Pipeline | None = None
                ) -> list[BenchResult]:
    t0 = time.perf_counter()
    llm = LLM(path, n_ctx=max(n_prompt, n_gen + 1, 16), n_threads=threads,
              n_batch=max(n_prompt, 1), n_gpu_layers=n_gpu_layers, device=device,
              pipeline=pipeline)
    load_s = time.perf_counter() - t0
    reader = llm._reader  # noqa: SLF001 - size facts of the file we just loaded
    size = sum(t.nbytes for t in reader.tensors)
    n_params = sum(t.n_elements for t in reader.tensors)
    name = Path(llm.model_path).name
    results: list[BenchResult] = []
    try:
        tests: list[tuple[str, int]] = []
        if n_prompt > 0:
            tests.append((f"pp{n_prompt}", n_prompt))
        if n_gen > 0:
            tests.append((f"tg{n_gen}", n_gen))
        for label, n in tests:
            times = []
            for rep in range(reps + 1):  # the first run warms caches and is not counted
                if label.startswith("pp"):
                    dt = _time_pp(llm, _tokens(n, llm.n_vocab, rep))
                else:
                    dt = _time_tg(llm, _tokens(1, llm.n_vocab, rep)[0], n)
                if rep:
                    times.append(n / dt)
            backend = "+".join(dict.fromkeys(b for b, _, _ in llm.model.placement
                                             if b != "remote"))
            ranks: tuple[float, ...] = ()
            if llm.model.pipeline is not None:
                backend += f" x{llm.model.pipeline.size} MPI ranks"
                ranks = tuple(b / (1 << 20) for b in llm.model.pipeline.peak_rss())
            results.append(BenchResult(
                model=name, size_bytes=size, n_params=n_params, test=label, backend=backend,
                threads=llm.n_threads, tokens_per_s=statistics.fmean(times),
                stdev=statistics.stdev(times) if len(times) > 1 else 0.0, reps=reps,
                load_s=load_s, peak_rss_mib=peak_rss_mib(), rank_rss_mib=ranks))
    finally:
        llm.close()
    return results


def _csv_value(v: object) -> str:
    return ";".join(f"{x:.0f}" for x in v) if isinstance(v, tuple) else str(v)


def _rss_cell(r: BenchResult) -> str:
    """Peak RSS in MiB; a pipeline's per rank (rank 0 first)."""
    if r.rank_rss_mib:
        return " / ".join(f"{x:.0f}" for x in r.rank_rss_mib)
    return f"{r.peak_rss_mib:.0f}"


def format_results(results: list[BenchResult], fmt: str) -> str:
    if fmt == "json":
        import json

        return json.dumps([r.as_dict() for r in results], indent=2)
    if fmt == "csv":
        fields = list(results[0].as_dict()) if results else []
        lines = [",".join(fields)]
        lines += [",".join(_csv_value(r.as_dict()[f]) for f in fields) for r in results]
        return "\n".join(lines)
    rows = ["| model | size | params | backend | threads | test | t/s | load s | peak RSS MiB |",
            "| --- | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: |"]
    for r in results:
        rows.append(f"| {r.model} | {r.size_bytes / (1 << 20):.1f} MiB | "
                    f"{r.n_params / 1e6:.1f} M | {r.backend} | {r.threads} | {r.test} | "
                    f"{r.tokens_per_s:.2f} ± {r.stdev:.2f} | {r.load_s:.3f} | "
                    f"{_rss_cell(r)} |")
    return "\n".join(rows)
