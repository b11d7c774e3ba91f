"""Flags shared by the commands that load a model and generate: model, context, sampling."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyllm.errors import GrammarError, PyllmError, SamplingError
from pyllm.runtime.footprint import MAX_COUNT
from pyllm.runtime.sampling import DEFAULTS, SamplingParams, field_name

if TYPE_CHECKING:
    from pyllm.runtime.grammar import Grammar

# The sampling flags (llama.cpp's names) with their type and meaning. The field each sets comes
# from pyllm.runtime.sampling's one alias table, its default from SamplingParams (shown in the
# help), and its values are checked once, by SamplingParams.
_SAMPLING_FLAGS: tuple[tuple[str, type, str, str | None], ...] = (
    # (flag, type, help, metavar)
    ("--temp", float, "temperature, 0 = greedy", None),
    ("--top-k", int, "top-k, 0 = off", None),
    ("--top-p", float, "top-p, 1.0 = off", None),
    ("--min-p", float, "min-p, 0.0 = off", None),
    ("--typical", float, "locally typical sampling p, 1.0 = off", None),
    ("--tfs", float, "tail-free sampling z, 1.0 = off", None),
    ("--repeat-penalty", float, "repetition penalty, 1.0 = off", None),
    ("--repeat-last-n", int, "tokens the penalties look back, -1 = all, 0 = off", None),
    ("--presence-penalty", float, "presence penalty, 0.0 = off", None),
    ("--frequency-penalty", float, "frequency penalty, 0.0 = off", None),
    ("--mirostat", int, "mirostat version: 0 = off, 1 or 2", None),
    ("--mirostat-lr", float, "mirostat learning rate", "ETA"),
    ("--mirostat-ent", float, "mirostat target entropy", "TAU"),
    ("--seed", int, "random seed, -1 = random", None),
)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


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


def gpu_layers(text: str) -> int:
    """``-ngl``: llama.cpp's layer count to offload, -1 = every layer and the output."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected -1 or a count >= 0, got {text!r}") from None
    if not -1 <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"expected -1 (all) or a count from 0 to {MAX_COUNT}, "
                                         f"got {value}")
    return value


def _layer_split(text: str) -> list[int]:
    from pyllm.errors import PipelineError
    from pyllm.runtime.mpi_wire import parse_layer_split

    try:
        return parse_layer_split(text)
    except PipelineError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_offload_args(g: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """-ngl / --device, as llama.cpp spells them; --mpi / --layer-split (a layer pipeline
    over the ranks of `mpirun`, run by pyllm.cli.main)."""
    g.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers", type=gpu_layers,
                   default=0, metavar="N", help="layers to offload to the GPU, the last N "
                   "(-1 or more than the model has: all, and the output; default 0)")
    g.add_argument("--device", default=None, metavar="NAME",
                   help="device to offload to: opencl, opencl:1, cuda:0, cpu (default: this "
                   "build's GPU backend; `pyllm info --devices` lists them)")
    g.add_argument("--mpi", action="store_true",
                   help="split the layers over the ranks of an MPI job (mpirun -np N pyllm ... "
                   "--mpi): rank 0 runs the command, each rank holds its share of the weights "
                   "(needs pip install \"pyllm[mpi]\")")
    g.add_argument("--layer-split", type=_layer_split, default=None, metavar="N,N,...",
                   help="with --mpi: layers per rank, in rank order (default: balanced by bytes)")


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_lora_args(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--lora FILE`` / ``--lora-scaled FILE SCALE`` (repeatable), as llama.cpp spells them."""
    p.add_argument("--lora", action="append", default=[], metavar="FILE",
                   help="a LoRA adapter GGUF, scale 1.0 (repeatable)")
    p.add_argument("--lora-scaled", action="append", default=[], nargs=2,
                   metavar=("FILE", "SCALE"), help="a LoRA adapter GGUF with a scale "
                   "(repeatable)")


def lora_specs(parser: argparse.ArgumentParser, args: argparse.Namespace
               ) -> list[tuple[str, float]]:
    """The adapters of ``--lora`` / ``--lora-scaled``, in the order given per flag."""
    specs = [(path, 1.0) for path in args.lora]
    for path, scale in args.lora_scaled:
        try:
            specs.append((path, _scale(scale)))
        except argparse.ArgumentTypeError as e:
            parser.error(f"--lora-scaled {path}: {e}")
    return specs


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
    add_offload_args(g)
    add_lora_args(g)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults as llama.cpp)")
    for flag, type_, text, metavar in _SAMPLING_FLAGS:
        default = DEFAULTS[field_name(_dest(flag))]
        # the flag's own default is None (= not given), so the sampling default stays in one place
        g.add_argument(flag, type=type_, metavar=metavar, help=f"{text} (default {default})")


def sampling_from_args(parser: argparse.ArgumentParser,
                       args: argparse.Namespace) -> SamplingParams:
    """The SamplingParams of the flags, built (and checked) once and handed on as it is; a bad
    value is a usage error (exit 2)."""
    given = {_dest(flag): getattr(args, _dest(flag), None) for flag, *_ in _SAMPLING_FLAGS}
    try:
        return SamplingParams.from_kwargs(**given)
    except SamplingError as e:
        parser.error(str(e))


def load_llm(args: argparse.Namespace, verbose: bool = False) -> Any:
    from pyllm.runtime.llm import LLM

    return LLM(args.model, n_ctx=args.ctx_size, n_threads=args.threads,
               n_batch=args.batch_size, n_gpu_layers=args.n_gpu_layers, device=args.device,
               lora=lora_specs(args.parser, args), pipeline=args.pipeline, verbose=verbose)


def add_grammar_args(p: argparse.ArgumentParser) -> None:
    """Constrained output, as llama.cpp spells the flags (at most one of them)."""
    g = p.add_argument_group("structured output (needs llguidance: pip install "
                             "\"pyllm[grammar]\")")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--grammar", metavar="GBNF", help="constrain the output to a GBNF grammar "
                   "(llama.cpp's syntax, start rule `root`)")
    x.add_argument("--grammar-file", metavar="FILE", help="read the GBNF grammar from FILE")
    x.add_argument("-j", "--json-schema", metavar="SCHEMA",
                   help="constrain the output to JSON valid against SCHEMA (JSON text; {} = any)")
    x.add_argument("-jf", "--json-schema-file", metavar="FILE",
                   help="read the JSON schema from FILE")
    x.add_argument("--regex", metavar="PATTERN",
                   help="constrain the output to match a regular expression")


def _probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return v


def add_context_shift_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("context shift (off by default, as in llama.cpp)")
    g.add_argument("--context-shift", action="store_true",
                   help="when the context is full, drop the oldest half of what follows the "
                   "kept tokens and go on (the cache is moved, not recomputed)")
    g.add_argument("--keep", type=_keep_count, default=0, metavar="N",
                   help="prompt tokens the shift never drops (-1 = the whole prompt; the BOS "
                   "token is always kept; default 0)")


def _keep_count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected -1 or a count >= 0, got {text!r}") from None
    if v < -1 or v > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"expected -1 or a count >= 0, got {text!r}")
    return v


def kept_tokens(args: argparse.Namespace, llm: Any, prompt: list[int]) -> int | None:
    """The generation's context_shift (tokens kept) for --keep / --context-shift, as llama.cpp
    counts them: --keep N prompt tokens after the BOS token, -1 all of the prompt."""
    if not args.context_shift:
        return None
    if args.keep < 0:
        return len(prompt)
    bos = 1 if prompt and prompt[0] == llm.tokenizer.bos_id else 0
    return min(args.keep + bos, len(prompt))


def add_speculative_args(p: argparse.ArgumentParser, draft_model: bool = True) -> None:
    """Speculative decoding, as llama.cpp spells the flags (pyllm.runtime.speculative);
    draft_model: whether the command takes --draft-model (the server: prompt lookup only)."""
    from pyllm.runtime import speculative as sp

    g = p.add_argument_group("speculative decoding (same output, faster where drafts hold)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--spec", choices=["ngram"], default=None,
                   help="ngram: draft by prompt lookup (the continuation of the latest earlier "
                   "match of the last tokens in the prompt and output; no second model)")
    if draft_model:
        x.add_argument("-md", "--draft-model", metavar="FILE",
                       help="draft with a small GGUF model of the same vocabulary")
    g.add_argument("--draft-max", type=positive_int, default=sp.DEFAULT_DRAFT_MAX, metavar="N",
                   help=f"tokens drafted per round at most (default {sp.DEFAULT_DRAFT_MAX})")
    g.add_argument("--draft-min", type=count, default=sp.DEFAULT_DRAFT_MIN, metavar="N",
                   help=f"shorter drafts are not used (default {sp.DEFAULT_DRAFT_MIN})")
    if draft_model:
        g.add_argument("--draft-p-min", type=_probability, default=sp.DEFAULT_DRAFT_P_MIN,
                       metavar="P", help="the draft model stops drafting at a token it gives a "
                       f"lower probability (default {sp.DEFAULT_DRAFT_P_MIN})")
    g.add_argument("--spec-ngram-max", type=positive_int, default=sp.DEFAULT_NGRAM_MAX,
                   metavar="N", help="prompt lookup: the longest suffix matched (default "
                   f"{sp.DEFAULT_NGRAM_MAX})")
    g.add_argument("--spec-ngram-min", type=positive_int, default=sp.DEFAULT_NGRAM_MIN,
                   metavar="N", help="prompt lookup: the shortest suffix matched (default "
                   f"{sp.DEFAULT_NGRAM_MIN})")


def ngram_factory(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    """The server's per-slot drafter maker for --spec ngram (None without it)."""
    from pyllm.errors import SpeculativeError
    from pyllm.runtime.speculative import NgramDrafter

    if args.spec != "ngram":
        return None

    def make() -> NgramDrafter:
        return NgramDrafter(args.spec_ngram_max, args.spec_ngram_min, args.draft_max,
                            args.draft_min)
    try:
        make()  # the settings are checked now, as usage errors
    except SpeculativeError as e:
        parser.error(str(e))
    return make


def drafter_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      llm: Any) -> Any:
    """The drafter of the flags for ``llm`` (None without --spec / --draft-model); bad settings
    are usage errors, an incompatible draft model exits 1 with its SpeculativeError."""
    from pyllm.errors import SpeculativeError
    from pyllm.runtime.speculative import DraftModel, NgramDrafter

    drafter: Any = None
    try:
        if args.spec == "ngram":
            drafter = NgramDrafter(args.spec_ngram_max, args.spec_ngram_min, args.draft_max,
                                   args.draft_min)
        elif getattr(args, "draft_model", None) is not None:
            drafter = DraftModel(args.draft_model, draft_max=args.draft_max,
                                 draft_min=args.draft_min, p_min=args.draft_p_min,
                                 n_ctx=llm.n_ctx, n_threads=llm.n_threads)
    except SpeculativeError as e:
        parser.error(str(e))
    if drafter is not None:
        drafter.attach(llm)  # an incompatible draft model: exit 1 before the prompt is read
    return drafter


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        # the flag is well formed; the file is bad input (exit 1, not a usage error)
        raise PyllmError(f"cannot read {what} {path}: {e}") from None


def grammar_from_args(parser: argparse.ArgumentParser,
                      args: argparse.Namespace) -> Grammar | None:
    """The Grammar of the flags, checked now: an invalid grammar, schema or pattern is a usage
    error (exit 2) quoting the parser; a missing llguidance or an unreadable file exit 1."""
    from pyllm.runtime.grammar import Grammar, llguidance

    made: Grammar | None = None
    try:
        if args.grammar is not None:
            made = Grammar.gbnf(args.grammar)
        elif args.grammar_file is not None:
            made = Grammar.gbnf(_read_text(args.grammar_file, "grammar file"))
        elif args.json_schema is not None:
            made = Grammar.json_schema(args.json_schema)
        elif args.json_schema_file is not None:
            made = Grammar.json_schema(_read_text(args.json_schema_file, "JSON schema file"))
        elif args.regex is not None:
            made = Grammar.regex(args.regex)
        if made is None:
            return None
        llguidance()  # not installed: exit 1 with what to install
    except GrammarError as e:
        if made is None:
            parser.error(str(e))
        raise
    try:
        return made.check()
    except GrammarError as e:
        parser.error(str(e))
