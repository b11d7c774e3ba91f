"""``pyllm convert-lora`` (a PEFT adapter or LLaMA2-Accessory checkpoint folder -> a GGUF
adapter) and ``pyllm export-lora`` (adapters baked into a base model's GGUF)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pyllm.cli.common import add_lora_args, lora_specs
from pyllm.cli.convert import OUTTYPES


def add_parser(sub: Any) -> None:
    p = sub.add_parser("convert-lora", help="convert a PEFT or LLaMA2-Accessory LoRA to a GGUF "
                       "adapter",
                       description="Convert ADAPTER_DIR to a GGUF LoRA adapter for BASE, in "
                       "llama.cpp's layout. ADAPTER_DIR is a Hugging Face PEFT folder "
                       "(adapter_config.json + adapter_model.safetensors or .bin) or a "
                       "LLaMA2-Accessory llama_peft checkpoint (consolidated.NN-of-MM.model.pth "
                       "shards, BASE a GGUF file): its bias and norm tuning is written as pyllm "
                       "delta tensors, or with --merge-tuning baked into a copy of BASE.")
    p.add_argument("src", metavar="ADAPTER_DIR", help="PEFT adapter or Accessory checkpoint "
                   "folder")
    p.add_argument("--base", required=True, metavar="BASE",
                   help="the base model: its GGUF file or (PEFT only) its Hugging Face folder")
    p.add_argument("-o", "--outfile", required=True, metavar="OUT.gguf",
                   help="adapter file to write (written atomically)")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16", type=str.lower,
                   help="tensor type of the adapter (default f16; deltas stay f32)")
    p.add_argument("--config", action="append", default=[], metavar="JSON",
                   help="Accessory only: params.json or a PEFT config (lora_rank, bias_tuning) "
                   "the checkpoint must agree with (repeatable; later keys win)")
    p.add_argument("--merge-tuning", metavar="MERGED_BASE.gguf",
                   help="Accessory only: write BASE with the bias/norm tuning baked in here; "
                   "OUT then holds only the LoRA pairs (a pair llama.cpp can run)")
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

    out = convert_lora(args.src, args.base, args.outfile, args.outtype, configs=args.config,
                       merge_tuning=args.merge_tuning, progress=not args.quiet)
    sys.stdout.write(f"wrote {out} ({args.outtype}, {_mib(out)})\n")
    if args.merge_tuning is not None:
        sys.stdout.write(f"wrote {args.merge_tuning} (the base with the bias/norm tuning merged, "
                         f"{_mib(args.merge_tuning)})\n")
    return 0


def _mib(path: str | Path) -> str:
    return f"{Path(path).stat().st_size / 2**20:.2f} MiB"


def run_export(args: argparse.Namespace) -> int:
    from pyllm.tools.export_lora import export_lora

    specs = lora_specs(args.parser, args)
    if not specs:
        args.parser.error("give at least one adapter: --lora FILE or --lora-scaled FILE SCALE")
    out = export_lora(args.base, specs, args.outfile, args.type)
    size = Path(out).stat().st_size
    sys.stdout.write(f"wrote {out} ({len(specs)} adapter(s) merged, {size / 2**20:.2f} MiB)\n")
    return 0
