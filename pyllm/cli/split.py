"""``pyllm split`` (a GGUF model -> llama.cpp gguf-split shards) and ``pyllm merge`` (back)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pyllm.cli.common import positive_int


def add_parser(sub: Any) -> None:
    p = sub.add_parser("split", help="split a GGUF model into shards (llama.cpp's gguf-split)",
                       description="Write IN as shards OUT_PREFIX-00001-of-0000N.gguf, tensors "
                       "in order, the metadata in the first; pyllm and llama.cpp load the set "
                       "by its first file. Default: at most 128 tensors per shard.")
    p.add_argument("input", metavar="IN", help="GGUF model to split")
    p.add_argument("prefix", metavar="OUT_PREFIX", help="path and name the shards start with")
    limit = p.add_mutually_exclusive_group()
    limit.add_argument("--max-size", metavar="SIZE",
                       help="most tensor bytes per shard, such as 500M or 2G (decimal units)")
    limit.add_argument("--max-tensors", type=positive_int, metavar="N",
                       help="most tensors per shard (default 128)")
    p.set_defaults(run=run_split, parser=p)

    m = sub.add_parser("merge", help="merge a split GGUF model into one file",
                       description="Write OUT: the split model whose shard FIRST is (any of "
                       "them; the others are found by their names) as one GGUF file.")
    m.add_argument("first", metavar="FIRST", help="a shard of the split model")
    m.add_argument("output", metavar="OUT", help="GGUF file to write (written atomically)")
    m.set_defaults(run=run_merge, parser=m)


def _mib(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.2f} MiB"


def run_split(args: argparse.Namespace) -> int:
    from pyllm.errors import GGUFError
    from pyllm.tools.split import parse_size, split_model

    try:
        max_size = None if args.max_size is None else parse_size(args.max_size)
    except GGUFError as e:
        args.parser.error(f"--max-size: {e}")
    shards = split_model(args.input, args.prefix, max_size=max_size,
                         max_tensors=args.max_tensors)
    for s in shards:
        sys.stdout.write(f"wrote {s} ({_mib(s)})\n")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from pyllm.tools.split import merge_model

    out = merge_model(args.first, args.output)
    sys.stdout.write(f"wrote {out} ({_mib(out)})\n")
    return 0
