"""Flags shared by the commands that load a model and generate: model, context, sampling."""

from __future__ import annotations

import argparse
from typing import Any

from pyllm.errors import SamplingError
from pyllm.footprint import MAX_COUNT

# flag -> SamplingParams field
_SAMPLING_FLAGS = {
    "temp": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "typical": "typical_p",
    "tfs": "tfs_z",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "mirostat": "mirostat",
    "mirostat_lr": "mirostat_eta",
    "mirostat_ent": "mirostat_tau",
    "seed": "seed",
}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not 0 < value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"expected a positive integer up to {MAX_COUNT}, "
                                         f"got {value}")
    return value


def count(text: str) -> int:
    """A count from 0 up to what the C++ side takes (its parameters are 32-bit)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {text!r}") from None
    if not 0 <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"expected a count from 0 to {MAX_COUNT}, got {value}")
    return value


def token_count(text: str) -> int:
    """``-n``: tokens to generate, as llama.cpp counts them: -1 = until the end of the text or
    a full context, 0 = none, N = at most N."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected -1 or a count >= 0, got {text!r}") from None
    if not -1 <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"expected -1 (until done) or a count from 0 to "
                                         f"{MAX_COUNT}, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", help="GGUF model file (default: the default model, "
                   "downloaded once)")
    g.add_argument("-c", "--ctx-size", type=positive_int, default=2048, metavar="N",
                   help="context size in tokens (default 2048)")
    g.add_argument("-t", "--threads", type=positive_int, default=None, metavar="N",
                   help="threads (default: physical cores)")
    g.add_argument("-b", "--batch-size", type=positive_int, default=512, metavar="N",
                   help="prompt tokens per forward chunk (default 512)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults as llama.cpp)")
    g.add_argument("--temp", type=float, help="temperature, 0 = greedy (0.8)")
    g.add_argument("--top-k", type=int, help="top-k, 0 = off (40)")
    g.add_argument("--top-p", type=float, help="top-p (0.95)")
    g.add_argument("--min-p", type=float, help="min-p (0.05)")
    g.add_argument("--typical", type=float, help="locally typical sampling p (1.0 = off)")
    g.add_argument("--tfs", type=float, help="tail-free sampling z (1.0 = off)")
    g.add_argument("--repeat-penalty", type=float, help="repetition penalty (1.0 = off)")
    g.add_argument("--repeat-last-n", type=int, help="tokens the penalties look back (64)")
    g.add_argument("--presence-penalty", type=float, help="presence penalty (0.0)")
    g.add_argument("--frequency-penalty", type=float, help="frequency penalty (0.0)")
    g.add_argument("--mirostat", type=int, choices=(0, 1, 2), help="mirostat version, 0 = off")
    g.add_argument("--mirostat-lr", type=float, metavar="ETA", help="mirostat learning rate (0.1)")
    g.add_argument("--mirostat-ent", type=float, metavar="TAU",
                   help="mirostat target entropy (5.0)")
    g.add_argument("--seed", type=int, help="random seed (-1 = random)")


def sampling_from_args(parser: argparse.ArgumentParser,
                       args: argparse.Namespace) -> dict[str, Any]:
    """SamplingParams keyword arguments from the flags; a bad value is a usage error (exit 2)."""
    from pyllm.sampling import SamplingParams

    kwargs = {field: getattr(args, flag) for flag, field in _SAMPLING_FLAGS.items()
              if getattr(args, flag, None) is not None}
    try:
        SamplingParams.from_kwargs(**kwargs)
    except SamplingError as e:
        parser.error(str(e))
    return kwargs


def load_llm(args: argparse.Namespace, verbose: bool = False) -> Any:
    from pyllm.model import LLM

    return LLM(args.model, n_ctx=args.ctx_size, n_threads=args.threads,
               n_batch=args.batch_size, verbose=verbose)
