"""``pyllm chat``: interactive multi-turn chat in the terminal.

With a chat model the conversation is rendered through its chat template (or ``--chat-format``)
each turn; the KV cache keeps the shared prefix, so only the new turn is evaluated. With
``-r/--reverse-prompt`` the model is used as a plain text completer instead: it writes until it
produces the reverse prompt (e.g. ``User:``), then the user types the next line.

Ctrl-C stops the current reply without leaving; ``/reset`` starts over; ``/exit`` or Ctrl-D leave.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import TYPE_CHECKING, Any

from pyllm.cli.common import (
    add_context_shift_args,
    add_grammar_args,
    add_model_args,
    add_sampling_args,
    add_speculative_args,
    drafter_from_args,
    grammar_from_args,
    load_llm,
    sampling_from_args,
    token_count,
)

if TYPE_CHECKING:
    from pyllm.runtime.sampling import SamplingParams

HELP = "commands: /reset (forget the conversation), /exit (leave); Ctrl-C stops a reply"


class Colors:
    def __init__(self, enabled: bool) -> None:
        self.user = "\033[32m" if enabled else ""
        self.info = "\033[33m" if enabled else ""
        self.reset = "\033[0m" if enabled else ""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("chat", help="interactive chat with a model",
                       description="Chat with a model in the terminal. " + HELP)
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.add_argument("--chat-format", metavar="NAME",
                   help="built-in chat format (default: the model's own template)")
    p.add_argument("-r", "--reverse-prompt", metavar="TEXT",
                   help="plain-completion mode: generate until TEXT, then read the next input")
    p.add_argument("-n", "--n-predict", type=token_count, default=-1, metavar="N",
                   help="maximum tokens per reply (-1 = until end of turn; default)")
    p.add_argument("--color", action="store_true", help="colour the prompt and the user's text")
    add_model_args(p)
    add_sampling_args(p)
    add_grammar_args(p)
    add_speculative_args(p)
    add_context_shift_args(p)
    p.set_defaults(run=run, parser=p)


def _read(prompt: str, colors: Colors) -> str | None:
    """One line of user input; None at end of input."""
    try:
        line = input(prompt + colors.user)
    except EOFError:
        return None
    finally:
        sys.stdout.write(colors.reset)
        sys.stdout.flush()
    return line


def _stream(pieces: Any) -> str:
    """Print pieces as they come; Ctrl-C stops early. Returns the text shown."""
    shown: list[str] = []
    try:
        for text in pieces:
            sys.stdout.write(text)
            sys.stdout.flush()
            shown.append(text)
    except KeyboardInterrupt:
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(shown)


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    sampling = sampling_from_args(parser, args)
    args.grammar_spec = grammar_from_args(parser, args)  # every reply follows it
    if args.chat_format is not None and args.reverse_prompt is not None:
        parser.error("--chat-format and --reverse-prompt exclude each other")
    if args.chat_format is not None:
        from pyllm.chat import list_formats

        if args.chat_format not in list_formats():
            parser.error(f"unknown chat format {args.chat_format!r} (known: "
                         f"{', '.join(list_formats())})")
    max_tokens = args.n_predict
    with contextlib.suppress(ImportError):  # not on every platform
        import readline  # noqa: F401 - enables line editing and history in input()
    colors = Colors(args.color)
    llm = load_llm(args)
    args.drafter = drafter_from_args(args.parser, args, llm)
    print(f"{colors.info}pyllm chat: {llm.model_path.name} ({HELP}){colors.reset}", flush=True)
    if args.reverse_prompt is not None:
        return _completion_loop(llm, args, sampling, max_tokens, colors)
    return _chat_loop(llm, args, sampling, max_tokens, colors)


def _chat_loop(llm: Any, args: argparse.Namespace, sampling: SamplingParams,
               max_tokens: int | None, colors: Colors) -> int:
    def fresh() -> list[dict[str, str]]:
        return [{"role": "system", "content": args.system}] if args.system else []

    messages = fresh()
    conv = None
    if args.context_shift:  # one running token stream, shifted when full
        from pyllm.runtime.conversation import Conversation

        bos = 1 if llm.tokenizer.add_bos and llm.tokenizer.bos_id is not None else 0
        conv = Conversation(llm, messages, chat_format=args.chat_format,
                            keep=None if args.keep < 0 else args.keep + bos)
    while True:
        line = _read("> ", colors)
        if line is None or line.strip() == "/exit":
            print()
            return 0
        if line.strip() == "/reset":
            messages = fresh()
            llm.reset()
            if conv is not None:
                conv.reset(messages)
            print(f"{colors.info}(conversation reset){colors.reset}")
            continue
        if not line.strip():
            continue
        if conv is not None:
            _stream(conv.say(line, max_tokens=max_tokens, sampling_params=sampling,
                             grammar=args.grammar_spec, drafter=args.drafter))
            continue
        messages.append({"role": "user", "content": line})
        reply = _stream(llm.chat(messages, max_tokens=max_tokens, chat_format=args.chat_format,
                                 stream=True, sampling_params=sampling,
                                 grammar=args.grammar_spec, drafter=args.drafter))
        messages.append({"role": "assistant", "content": reply})


def _completion_loop(llm: Any, args: argparse.Namespace, sampling: SamplingParams,
                     max_tokens: int | None, colors: Colors) -> int:
    rp: str = args.reverse_prompt
    transcript = args.system + "\n" if args.system else ""
    while True:
        line = _read(rp + " ", colors)
        if line is None or line.strip() == "/exit":
            print()
            return 0
        if line.strip() == "/reset":
            transcript = args.system + "\n" if args.system else ""
            llm.reset()
            print(f"{colors.info}(conversation reset){colors.reset}")
            continue
        transcript += f"{rp} {line}\n"
        reply = _stream(llm.stream(transcript, max_tokens=max_tokens, stop=[rp],
                                   sampling_params=sampling, grammar=args.grammar_spec,
                                   drafter=args.drafter))
        transcript += reply.rstrip("\n") + "\n"
