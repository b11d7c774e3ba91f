"""``pyllm pull``: download the default model into the cache (once) and print its path."""

from __future__ import annotations

import argparse
from typing import Any

from pyllm.runtime.default_model import DEFAULT_MODEL, ensure_model


def add_parser(sub: Any) -> None:
    p = sub.add_parser("pull",
                       help=f"download the default model ({DEFAULT_MODEL.name})",
                       description="Fetch the default model into the per-user cache "
                       "($PYLLM_CACHE, $XDG_CACHE_HOME/pyllm or ~/.cache/pyllm) and print "
                       "its path.")
    p.add_argument("--verify", action="store_true",
                   help="re-check the sha256 of a cached file (re-download if it differs)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    path = ensure_model(verify_cached=args.verify)
    print(path)
    return 0
