"""``pyllm quantize``: rewrite a GGUF model in another tensor type (F16, Q8_0, Q4_K_M, ...)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pyllm.cli.common import positive_int


def add_parser(sub: Any) -> None:
    from pyllm.tools.quantize import FILE_TYPES

    names = ", ".join(FILE_TYPES)
    p = sub.add_parser("quantize", help="convert a GGUF model to another quantization type",
                       description="Write OUT: the model IN with its weight matrices in TYPE. "
                       "The _S/_M/_L k-quant mixes give some tensors more bits the way "
                       f"llama.cpp's quantizer does. Types: {names}.")
    p.add_argument("input", metavar="IN", help="source GGUF file (F32/F16/BF16, or any type "
                   "with --allow-requantize)")
    p.add_argument("output", metavar="OUT", help="GGUF file to write (written atomically: "
                   "Ctrl-C exits 130 and SIGTERM 143, both without leaving a partial file)")
    p.add_argument("type", metavar="TYPE", help=f"target type: {names}")
    p.add_argument("-t", "--threads", type=positive_int, default=None, metavar="N",
                   help="tensors converted in parallel (default: CPU count)")
    p.add_argument("--allow-requantize", action="store_true",
                   help="allow converting tensors that are already quantized (loses precision)")
    p.add_argument("--imatrix", metavar="FILE",
                   help="importance matrix (pyllm imatrix / llama-imatrix output, GGUF or .dat) "
                   "to guide the rounding, as llama-quantize --imatrix does")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=run, parser=p)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def run(args: argparse.Namespace) -> int:
    from pyllm.errors import QuantError
    from pyllm.tools.quantize import quantize_file, resolve_file_type

    parser: argparse.ArgumentParser = args.parser
    try:
        ft = resolve_file_type(args.type)
    except QuantError as e:
        parser.error(str(e))
    # SIGTERM mid-write ends in pyllm.cli.main (WriteTerminated: "terminated", exit 143)
    result = quantize_file(args.input, args.output, ft, threads=args.threads,
                           allow_requantize=args.allow_requantize, progress=not args.quiet,
                           imatrix=args.imatrix)
    out = sys.stdout
    types = ", ".join(f"{k} x{v}" for k, v in result.type_counts().items())
    src_bpw = 8 * result.src_tensor_bytes / max(1, _n_weights(result))
    dst_bpw = 8 * result.dst_tensor_bytes / max(1, _n_weights(result))
    out.write(f"quantized {result.src} -> {result.dst} as {ft.name} "
              f"(file type {ft.ftype}) in {result.seconds:.1f} s\n")
    out.write(f"size before: {_mib(result.src_file_bytes)} "
              f"(tensors {_mib(result.src_tensor_bytes)}, {src_bpw:.2f} bits/weight)\n")
    out.write(f"size after:  {_mib(result.dst_file_bytes)} "
              f"(tensors {_mib(result.dst_tensor_bytes)}, {dst_bpw:.2f} bits/weight)\n")
    out.write(f"tensor types: {types}; {result.n_converted} converted"
              + (f", {result.n_fallback} with a fallback type (row length)"
                 if result.n_fallback else "") + "\n")
    if args.imatrix:
        out.write(f"importance matrix: used for {len(result.imatrix_used)} tensors"
                  + (f"; {len(result.imatrix_unused)} tensors of types that take none "
                     "(Q8_0, the ternary types) were quantized without it"
                     if result.imatrix_unused else "") + "\n")
    return 0


def _n_weights(result: Any) -> int:
    total = 0
    for p in result.plans:
        n = 1
        for d in p.dims:
            n *= d
        total += n
    return total
