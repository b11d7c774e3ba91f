"""``pyllm convert``: a Hugging Face or Meta checkpoint folder -> one GGUF file (f32, f16, bf16
or q8_0)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pyllm.errors import ConvertError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face or Meta checkpoint to GGUF",
                       description="Convert SRC to one GGUF file: a Hugging Face folder "
                       "(config.json, *.safetensors or pytorch_model*.bin, tokenizer files) or a "
                       "Meta folder (params.json, consolidated.*.pth shards, tokenizer.model).")
    p.add_argument("src", metavar="SRC", help="model folder")
    p.add_argument("-o", "--outfile", required=True, metavar="OUT.gguf",
                   help="GGUF file to write (written atomically)")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16", type=str.lower,
                   help="tensor type of the weight matrices (default f16; norms stay f32)")
    p.add_argument("--config", action="append", default=[], metavar="JSON",
                   help="extra JSON config merged over config.json / params.json (repeatable; "
                   "later files win): rope_theta, rope_scaling, fastllm-style chat roles, ...")
    p.add_argument("--name", help="general.name to store (default: the folder name)")
    p.add_argument("--tokenizer-pre", metavar="NAME",
                   help="pre-tokenizer name for a BPE tokenizer.json that is not recognised")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run, parser=p)


def read_configs(paths: list[str]) -> list[dict[str, Any]]:
    """The JSON objects in ``paths``, in order; an unreadable or malformed one is bad input
    (ConvertError, exit 1), as a bad prompt file is: the flag itself was well formed."""
    configs: list[dict[str, Any]] = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise ConvertError(f"cannot read config {path}: {e}") from None
        except json.JSONDecodeError as e:
            raise ConvertError(f"config {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConvertError(f"config {path} must hold a JSON object, not "
                               f"{type(data).__name__}")
        configs.append(data)
    return configs


def run(args: argparse.Namespace) -> int:
    from pyllm.tools.convert import convert

    # merged in order by the converter (later keys win; fastllm's dotted keys update one field)
    configs = read_configs(args.config)
    out = convert(args.src, args.outfile, args.outtype, configs, name=args.name,
                  tokenizer_pre=args.tokenizer_pre, progress=not args.quiet)
    size = Path(out).stat().st_size
    sys.stdout.write(f"wrote {out} ({args.outtype}, {size / 2**20:.2f} MiB)\n")
    return 0
