"""``pyllm run``: continue a prompt and stream the text to stdout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pyllm.cli.common import (
    add_context_shift_args,
    add_grammar_args,
    add_model_args,
    add_sampling_args,
    add_speculative_args,
    drafter_from_args,
    grammar_from_args,
    kept_tokens,
    load_llm,
    sampling_from_args,
    token_count,
)
from pyllm.errors import PyllmError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="generate a continuation of a prompt",
                       description="Continue PROMPT with the model and stream the text to stdout.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="the prompt text")
    src.add_argument("-f", "--file", metavar="PROMPT_FILE", help="read the prompt from a file")
    p.add_argument("-n", "--n-predict", type=token_count, default=128, metavar="N",
                   help="tokens to generate (-1 = until end of text or full context, "
                   "0 = none; 128)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when TEXT is generated (repeatable; not printed)")
    p.add_argument("--verbose", action="store_true",
                   help="print load info and speed (prompt and generation tokens/s) to stderr")
    c = p.add_argument_group("prompt cache")
    c.add_argument("--prompt-cache", metavar="FILE",
                   help="reuse the longest cached prefix of the prompt from FILE (a state file "
                   "this option wrote for the same model) and save the state after the prompt")
    c.add_argument("--prompt-cache-all", action="store_true",
                   help="save the state after the generated text too")
    c.add_argument("--prompt-cache-ro", action="store_true",
                   help="read the prompt cache but never write it")
    add_model_args(p)
    add_sampling_args(p)
    add_grammar_args(p)
    add_speculative_args(p)
    add_context_shift_args(p)
    p.set_defaults(run=run, parser=p)


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    sampling = sampling_from_args(parser, args)
    grammar = grammar_from_args(parser, args)
    if args.file is not None:
        try:
            prompt = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            # the flag is well formed; the file is bad input (exit 1, not a usage error)
            raise PyllmError(f"cannot read prompt file {args.file}: {e}") from None
    else:
        prompt = args.prompt
    from pyllm.runtime.completions import make_generation
    from pyllm.runtime.generation import prompt_tokens

    if (args.prompt_cache_all or args.prompt_cache_ro) and args.prompt_cache is None:
        parser.error("--prompt-cache-all and --prompt-cache-ro need --prompt-cache FILE")
    llm = load_llm(args, verbose=args.verbose)
    drafter = drafter_from_args(parser, args, llm)
    tokens = prompt_tokens(llm, prompt)
    if args.prompt_cache is not None:
        _use_prompt_cache(llm, tokens, args)
    gen = make_generation(llm, tokens, max_tokens=args.n_predict,
                          stop=args.stop, sampling_params=sampling, grammar=grammar,
                          drafter=drafter, context_shift=kept_tokens(args, llm, tokens))
    out = sys.stdout
    out.write(prompt)
    out.flush()
    for piece in gen:
        if piece.text:
            out.write(piece.text)
            out.flush()
    out.write("\n")
    out.flush()
    if args.verbose:
        n_gen = len(gen.tokens)
        pp = gen.n_prompt_evaluated / gen.t_prompt if gen.t_prompt > 0 else 0.0
        tg = n_gen / gen.t_generate if gen.t_generate > 0 else 0.0
        print(f"prompt: {gen.n_prompt_evaluated} tokens in {gen.t_prompt * 1000:.1f} ms "
              f"({pp:.1f} tokens/s)\n"
              f"generation: {n_gen} tokens in {gen.t_generate * 1000:.1f} ms ({tg:.1f} tokens/s), "
              f"finish: {gen.finish_reason}"
              + (f", {gen.n_shifts} context shifts" if gen.n_shifts else ""), file=sys.stderr)
        if drafter is not None:
            sp = gen.spec
            print(f"speculative: {sp.rounds} rounds, {sp.drafted} tokens drafted, "
                  f"{sp.accepted} accepted ({100 * sp.acceptance:.1f} %)", file=sys.stderr)
    if args.prompt_cache_all and not args.prompt_cache_ro:
        from pyllm.runtime.state_file import save_state_file

        save_state_file(llm, args.prompt_cache)
    return 0


def _use_prompt_cache(llm: Any, tokens: list[int], args: argparse.Namespace) -> None:
    """llama.cpp's --prompt-cache: load the state in the file (if there is one), evaluate the
    prompt from the longest common prefix on, and save the state after it (unless read-only)."""
    from pyllm.runtime.state_file import load_state_file, save_state_file
    from pyllm.runtime.steps import common_prefix

    path = Path(args.prompt_cache)
    reused = 0
    if path.exists():
        state = load_state_file(llm, path)
        llm.load_state(state)
        reused = min(common_prefix(state.tokens, tokens), len(tokens) - 1)
    llm.eval_prompt(tokens)
    if args.verbose:
        print(f"prompt cache: {reused} of {len(tokens)} prompt tokens reused from {path}",
              file=sys.stderr)
    if not args.prompt_cache_ro:
        save_state_file(llm, path)
