"""``pyllm bench``: prompt-processing and generation speed, like llama-bench."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pyllm.cli.common import add_offload_args, count, positive_int


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure prompt and generation speed (tokens/s)",
                       description="Measure prompt processing (pp) and text generation (tg) "
                       "tokens/s, mean ± stdev over repetitions after a warm-up run.")
    # "extend" with nargs="+": both "-t 1 2" (as in the README) and "-t 1 -t 2" work
    p.add_argument("-m", "--model", action="extend", nargs="+", default=None, metavar="MODEL",
                   help="GGUF models (several, repeatable; default: the default model)")
    p.add_argument("-p", "--n-prompt", type=count, default=512, metavar="N",
                   help="prompt tokens (0 = skip; 512)")
    p.add_argument("-n", "--n-gen", type=count, default=128, metavar="N",
                   help="generated tokens (0 = skip; 128)")
    p.add_argument("-t", "--threads", type=positive_int, action="extend", nargs="+",
                   default=None, metavar="N",
                   help="thread counts (several, repeatable; default: physical cores)")
    add_offload_args(p)
    p.add_argument("-r", "--repetitions", type=positive_int, default=5, metavar="N",
                   help="timed repetitions per test (5)")
    p.add_argument("-o", "--output", choices=("md", "json", "csv"), default="md",
                   help="output format (md)")
    p.set_defaults(run=run, parser=p)


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    if args.n_prompt == 0 and args.n_gen == 0:
        parser.error("-p and -n must not both be 0")
    from pyllm.tools.throughput import bench_model, format_results

    results = []
    for model in args.model or [None]:
        for threads in args.threads or [None]:
            results += bench_model(model, args.n_prompt, args.n_gen, threads, args.repetitions,
                                   n_gpu_layers=args.n_gpu_layers, device=args.device,
                                   pipeline=args.pipeline)
    print(format_results(results, args.output))
    sys.stdout.flush()
    return 0
