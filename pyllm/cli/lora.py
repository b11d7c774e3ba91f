"""``pyllm convert-lora`` (a PEFT adapter folder -> a GGUF adapter) and ``pyllm export-lora``
(adapters baked into a base model's GGUF)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pyllm.cli.common import add_lora_args, lora_specs
from pyllm.cli.convert import OUTTYPES


def add_parser(sub: Any) -> None:
    p = sub.add_parser("convert-lora", help="convert a PEFT LoRA adapter to a GGUF adapter",
                       description="Convert ADAPTER_DIR (adapter_config.json + "
                       "adapter_model.safetensors or .bin, as Hugging Face peft saves it) to a "
                       "GGUF LoRA adapter for BASE, in llama.cpp's layout.")
    p.add_argument("src", metavar="ADAPTER_DIR", help="PEFT adapter folder")
    p.add_argument("--base", required=True, metavar="BASE",
                   help="the base model: its GGUF file or its Hugging Face folder")
    p.add_argument("-o", "--outfile", required=True, metavar="OUT.gguf",
                   help="adapter file to write (written atomically)")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16", type=str.lower,
                   help="tensor type of the adapter (default f16)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_convert, parser=p)

    e = sub.add_parser("export-lora", help="merge LoRA adapters into a model's GGUF",
                       description="Write OUT: BASE with the adapters baked in (each adapted "
                       "matrix dequantized, the low-rank products added, encoded again in its "
                       "own type or TYPE).")
    e.add_argument("base", metavar="BASE.gguf", help="the base model")
    add_lora_args(e)
    e.add_argument("-o", "--outfile", required=True, metavar="OUT.gguf",
                   help="merged model to write (written atomically)")
    e.add_argument("type", nargs="?", metavar="TYPE",
                   help="type of the adapted matrices (default: each keeps the base's)")
    e.set_defaults(run=run_export, parser=e)


def run_convert(args: argparse.Namespace) -> int:
    from pyllm.tools.convert.lora import convert_lora

    out = convert_lora(args.src, args.base, args.outfile, args.outtype, progress=not args.quiet)
    size = Path(out).stat().st_size
    sys.stdout.write(f"wrote {out} ({args.outtype}, {size / 2**20:.2f} MiB)\n")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from pyllm.tools.export_lora import export_lora

    specs = lora_specs(args.parser, args)
    if not specs:
        args.parser.error("give at least one adapter: --lora FILE or --lora-scaled FILE SCALE")
    out = export_lora(args.base, specs, args.outfile, args.type)
    size = Path(out).stat().st_size
    sys.stdout.write(f"wrote {out} ({len(specs)} adapter(s) merged, {size / 2**20:.2f} MiB)\n")
    return 0
