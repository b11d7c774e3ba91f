"""``pyllm info``: summarize a GGUF file (architecture, hyper-parameters, tokenizer, tensors)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from pyllm.formats.gguf.split import ModelFile, open_gguf
from pyllm.runtime.default_model import resolve_model_path

# metadata arrays longer than this are summarized instead of printed
_MAX_LISTED = 16


def add_parser(sub: Any) -> None:
    p = sub.add_parser("info", help="show what a GGUF file holds",
                       description="Print architecture, hyper-parameters, tokenizer summary, "
                       "chat template presence and the tensor table of a GGUF file.")
    p.add_argument("model", nargs="?", help="GGUF file (default: the default model)")
    p.add_argument("-m", "--model", dest="model_opt", metavar="MODEL",
                   help="GGUF file (same as the positional argument)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-tensors", action="store_true", help="leave out the tensor table")
    p.add_argument("--devices", action="store_true",
                   help="list the backends and devices of this build instead (no model needed)")
    p.set_defaults(run=run)


def _plain(value: Any) -> Any:
    """Metadata value -> JSON-friendly value, long arrays summarized."""
    import numpy as np  # only here: the CLI's other commands need none

    if isinstance(value, np.ndarray):
        if value.size > _MAX_LISTED:
            return {"array": str(value.dtype), "length": int(value.size)}
        return value.tolist()
    if isinstance(value, list):
        if len(value) > _MAX_LISTED:
            return {"array": "string" if value and isinstance(value[0], str) else "array",
                    "length": len(value)}
        return [_plain(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    return value


def summarize(reader: ModelFile) -> dict[str, Any]:
    md = reader.metadata
    arch = md.get("general.architecture", "")
    prefix = arch + "."
    hparams = {k[len(prefix):]: _plain(v) for k, v in md.items()
               if arch and k.startswith(prefix)}
    tokens = md.get("tokenizer.ggml.tokens")
    tokenizer = {
        "model": md.get("tokenizer.ggml.model"),
        "pre": md.get("tokenizer.ggml.pre"),
        "n_tokens": len(tokens) if tokens is not None else 0,
        "n_merges": len(md.get("tokenizer.ggml.merges", [])),
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "add_bos_token": md.get("tokenizer.ggml.add_bos_token"),
    }
    template = md.get("tokenizer.chat_template")
    types = Counter(t.type.name for t in reader.tensors)
    block_count = md.get(f"{arch}.block_count") if arch else None
    return {
        "path": reader.path,
        "shards": list(getattr(reader, "paths", [reader.path])),
        "gguf_version": reader.version,
        "file_size": reader.file_size,
        "architecture": arch,
        "name": md.get("general.name"),
        "block_count": block_count,
        "hyperparameters": hparams,
        "tokenizer": tokenizer,
        "chat_template": {"present": template is not None,
                          "length": len(template) if template else 0},
        "n_tensors": len(reader.tensors),
        "tensor_types": dict(sorted(types.items())),
        "tensor_bytes": sum(t.nbytes for t in reader.tensors),
        "n_parameters": sum(t.n_elements for t in reader.tensors),
        "metadata": {k: _plain(v) for k, v in md.items()},
        "tensors": [
            {"name": t.name, "type": t.type.name, "shape": list(t.dims), "bytes": t.nbytes}
            for t in reader.tensors
        ],
    }


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def print_text(s: dict[str, Any], with_tensors: bool, out: Any = sys.stdout) -> None:
    w = out.write
    w(f"file:          {s['path']} ({_human(s['file_size'])}, GGUF v{s['gguf_version']})\n")
    if len(s["shards"]) > 1:
        w(f"shards:        {len(s['shards'])} (split model; the size is theirs together)\n")
    w(f"architecture:  {s['architecture'] or '(none)'}\n")
    if s["name"]:
        w(f"name:          {s['name']}\n")
    w(f"blocks:        {s['block_count']}\n")
    w(f"parameters:    {s['n_parameters']:,}\n")
    w(f"tensors:       {s['n_tensors']}  types: "
      + ", ".join(f"{k} x{v}" for k, v in s["tensor_types"].items()) + "\n")
    if s["hyperparameters"]:
        w("hyper-parameters:\n")
        for k, v in s["hyperparameters"].items():
            w(f"  {k:<40} {v}\n")
    t = s["tokenizer"]
    if t["model"]:
        w(f"tokenizer:     {t['model']} (pre: {t['pre'] or '-'}), {t['n_tokens']} tokens, "
          f"{t['n_merges']} merges, bos={t['bos_token_id']} eos={t['eos_token_id']}\n")
    else:
        w("tokenizer:     none\n")
    ct = s["chat_template"]
    w(f"chat template: {'yes (' + str(ct['length']) + ' chars)' if ct['present'] else 'no'}\n")
    if with_tensors:
        w("\n")
        width = max((len(x["name"]) for x in s["tensors"]), default=4)
        w(f"{'name':<{width}}  {'type':<7} {'shape':<22} {'bytes':>12}\n")
        for x in s["tensors"]:
            shape = "x".join(str(d) for d in x["shape"])
            w(f"{x['name']:<{width}}  {x['type']:<7} {shape:<22} {x['bytes']:>12,}\n")


def print_devices(as_json: bool) -> None:
    from pyllm.runtime.devices import backends, devices

    found = devices()
    if as_json:
        json.dump({"backends": backends(), "devices": [vars(d) for d in found]}, sys.stdout,
                  indent=2)
        sys.stdout.write("\n")
        return
    print(f"backends of this build: {', '.join(backends())}")
    for d in found:
        memory = f"{d.memory / 2**30:.1f} GiB" if d.memory else "host memory"
        print(f"  {d.backend:<10} {d.name} ({memory}; {d.details})")


def run(args: argparse.Namespace) -> int:
    if args.devices:
        print_devices(args.json)
        return 0
    if args.model and args.model_opt:
        print("error: give the model either positionally or with -m, not both", file=sys.stderr)
        return 2
    path = resolve_model_path(args.model or args.model_opt)
    reader = open_gguf(path)
    summary = summarize(reader)
    if args.json:
        if args.no_tensors:
            summary.pop("tensors")
        json.dump(summary, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print_text(summary, not args.no_tensors)
    return 0
