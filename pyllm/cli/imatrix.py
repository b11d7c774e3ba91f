"""``pyllm imatrix``: compute an importance matrix over a text, in llama.cpp's formats."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pyllm.cli.common import positive_int


def add_parser(sub: Any) -> None:
    p = sub.add_parser("imatrix", help="compute an importance matrix (for quantize --imatrix)",
                       description="Evaluate TEXT in chunks of CTX tokens and write, for every "
                       "weight matrix, the sums of its squared input activations (llama.cpp's "
                       "llama-imatrix: the same GGUF file format, or its older .dat).")
    p.add_argument("-m", "--model", help="GGUF model file (default: the default model)")
    p.add_argument("-f", "--file", metavar="TEXT",
                   help="text file to evaluate (without it, --in-file files are only merged)")
    p.add_argument("-o", "--output", metavar="FILE", default="imatrix.gguf",
                   help="output file (default imatrix.gguf; written atomically)")
    p.add_argument("--output-format", choices=("gguf", "dat"), default=None,
                   help="gguf (default) or llama.cpp's legacy dat (the default for a .dat name)")
    p.add_argument("-c", "--ctx-size", type=positive_int, default=512, metavar="N",
                   help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=-1, metavar="N",
                   help="chunks to process (default -1: all whole chunks of the text)")
    p.add_argument("-b", "--batch-size", type=positive_int, default=512, metavar="N",
                   help="tokens per forward chunk (default 512)")
    p.add_argument("-t", "--threads", type=positive_int, default=None, metavar="N",
                   help="threads (default: physical cores)")
    p.add_argument("--process-output", action="store_true",
                   help="also collect output.weight's input (llama.cpp: off by default)")
    p.add_argument("--in-file", action="append", default=[], metavar="FILE",
                   help="importance matrix to add to (repeatable); without -f only merges")
    p.add_argument("--no-ppl", action="store_true", help="do not compute the perplexity")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=run, parser=p)


def run(args: argparse.Namespace) -> int:
    from pyllm.atomic import check_destination
    from pyllm.errors import QuantError
    from pyllm.formats.imatrix import read_imatrix, write_imatrix
    from pyllm.runtime.llm import LLM
    from pyllm.tools.imatrix import ChunkReport, compute_imatrix
    from pyllm.tools.perplexity import tokenize_text

    parser: argparse.ArgumentParser = args.parser
    if args.file is None and not args.in_file:
        parser.error("give the text to evaluate with -f/--file (or --in-file files to merge)")
    legacy = (args.output_format == "dat" if args.output_format is not None
              else args.output.endswith(".dat"))
    text = None
    if args.file is not None:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise QuantError(f"cannot read text file {args.file}: {e}") from None
    previous = [read_imatrix(f, chunk_size=args.ctx_size) for f in args.in_file]
    sources = [args.model, *args.in_file] if args.model else list(args.in_file)
    check_destination(args.output, sources, QuantError)  # before minutes of work
    if text is None:  # merge only
        im = previous[0]
        for other in previous[1:]:
            im.merge(other)
        write_imatrix(im, args.output, legacy=legacy, sources=sources)
        print(f"wrote {args.output}: {len(im.entries)} entries merged from "
              f"{len(previous)} files")
        return 0

    def report(r: ChunkReport) -> None:
        if args.quiet:
            return
        ppl = "" if args.no_ppl else f", perplexity {r.ppl:.4f}"
        eta = r.seconds / (r.chunk + 1) * (r.n_chunks - r.chunk - 1)
        sys.stderr.write(f"\rchunk {r.chunk + 1}/{r.n_chunks}{ppl}, {r.seconds:.1f} s "
                         f"(~{eta:.0f} s left)   ")
        sys.stderr.flush()

    with LLM(args.model, n_ctx=args.ctx_size, n_threads=args.threads,
             n_batch=min(args.batch_size, args.ctx_size), kv_type="f32") as llm:
        tokens = tokenize_text(llm, text)
        im = compute_imatrix(llm, tokens, args.ctx_size, n_chunks=args.chunks,
                             process_output=args.process_output, compute_ppl=not args.no_ppl,
                             dataset=args.file, on_chunk=report)
    if not args.quiet:
        sys.stderr.write("\n")
    for other in previous:
        im.merge(other)
    write_imatrix(im, args.output, legacy=legacy, sources=sources)
    print(f"wrote {args.output}: {len(im.entries)} entries, {im.chunk_count} chunks of "
          f"{args.ctx_size} tokens" + (" (legacy .dat format)" if legacy else ""))
    return 0
