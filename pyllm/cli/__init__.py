"""The ``pyllm`` command line.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and ``run(args) -> int``.
Errors from the PyllmError family become one ``error: ...`` line on stderr and exit code 1; bad
flags exit with 2; nothing ever shows a traceback unless ``PYLLM_DEBUG=1`` is set.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn, TextIO

from pyllm.atomic import WriteTerminated
from pyllm.errors import PyllmError


class _VersionAction(argparse.Action):
    """``--version``: the version is looked up only when asked for (importlib.metadata costs
    ~15 ms, a tenth of a cold run's time to its first token)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        from pyllm import __version__

        print(f"pyllm {__version__}")
        parser.exit()


class CliParser(argparse.ArgumentParser):
    """argparse with a one-line error message and exit code 2 for usage errors."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


# command -> the module under pyllm.cli that adds its parser and runs it, in --help's order
COMMANDS = {
    "run": "run", "chat": "chat", "info": "info", "pull": "pull", "bench": "bench",
    "convert": "convert", "convert-lora": "lora", "export-lora": "lora", "quantize": "quantize",
    "imatrix": "imatrix", "split": "split", "merge": "split", "perplexity": "perplexity",
    "serve": "serve",
}


def _subcommands(command: str | None = None) -> list[ModuleType]:
    """The modules of every command, or only of ``command``."""
    import importlib

    names = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    return [importlib.import_module(f"pyllm.cli.{name}") for name in names]


def build_parser(command: str | None = None) -> CliParser:
    """The CLI's parser; with ``command``, only that command's (what running it needs: building
    every command's parser imports their modules, numpy among them, ~50 ms of a cold start)."""
    parser = CliParser(
        prog="pyllm",
        description="Run LLaMA-family GGUF language models.",
    )
    parser.add_argument("--version", action=_VersionAction,
                        help="show program's version number and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CliParser)
    for module in _subcommands(command):
        module.add_parser(sub)
    return parser


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """Warnings as one ``pyllm: warning: ...`` line (no file name and source line)."""
    print(f"pyllm: warning: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    args_list = sys.argv[1:] if argv is None else list(argv)
    # the command is the first argument (no option comes before it but --version / --help)
    parser = build_parser(args_list[0] if args_list else None)
    args = parser.parse_args(args_list)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return _run(parser, args)
    except PyllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except WriteTerminated as e:
        # SIGTERM while an output was written: its temp file is gone, as after Ctrl-C; exit
        # 143 = 128 + SIGTERM, what a shell reports for a process SIGTERM ended
        print("terminated: the partial output was removed", file=sys.stderr)
        return int(e.code)  # type: ignore[arg-type]
    except BrokenPipeError:
        # stdout closed early (e.g. piped into `head`): not an error for the user.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except Exception as e:  # last line of defence: a bug must still not dump a traceback
        if os.environ.get("PYLLM_DEBUG"):
            raise
        print(f"error: internal error ({type(e).__name__}: {e}); set PYLLM_DEBUG=1 for details",
              file=sys.stderr)
        return 1


def _run(parser: CliParser, args: argparse.Namespace) -> int:
    """The subcommand; with --mpi, rank 0 runs it over a pipeline and every other rank serves
    its share of the layers (pyllm.runtime.mpi) until rank 0 is done."""
    args.pipeline = None
    if getattr(args, "layer_split", None) is not None and not args.mpi:
        parser.error("--layer-split needs --mpi")
    if not getattr(args, "mpi", False):
        return int(args.run(args) or 0)
    from pyllm.runtime.mpi import Pipeline

    args.pipeline = Pipeline(layer_split=args.layer_split)
    if args.pipeline.rank != 0:
        return args.pipeline.serve()
    try:
        return int(args.run(args) or 0)
    finally:
        args.pipeline.shutdown()


if __name__ == "__main__":
    sys.exit(main())
