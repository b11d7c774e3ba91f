"""``pyllm perplexity``: perplexity of a model over a text file, and KL divergence against a base.

Counts as llama.cpp's perplexity tool does (non-overlapping chunks of CTX tokens, second half of
each chunk scored); see :mod:`pyllm.tools.perplexity`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pyllm.cli.common import add_lora_args, add_offload_args, lora_specs, positive_int


def add_parser(sub: Any) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a model over a text (llama.cpp style)",
                       description="Perplexity over non-overlapping chunks of CTX tokens of TEXT; "
                       "as llama.cpp, only the second half of each chunk is scored. With "
                       "--kl-divergence-base the model's distributions are saved; with "
                       "--kl-divergence another model is compared with such a file.")
    p.add_argument("-m", "--model", help="GGUF model file (default: the default model)")
    p.add_argument("-f", "--file", metavar="TEXT",
                   help="text file to score (optional with --kl-divergence: the base's tokens)")
    p.add_argument("-c", "--ctx-size", type=positive_int, default=None, metavar="N",
                   help="tokens per chunk (default 512; with --kl-divergence: the base's)")
    p.add_argument("-b", "--batch-size", type=positive_int, default=512, metavar="N",
                   help="tokens per forward chunk (default 512)")
    p.add_argument("-t", "--threads", type=positive_int, default=None, metavar="N",
                   help="threads (default: physical cores)")
    add_offload_args(p)
    add_lora_args(p)
    kl = p.add_mutually_exclusive_group()
    kl.add_argument("--kl-divergence-base", metavar="FILE",
                    help="save this model's log-probabilities to FILE (the KL base)")
    kl.add_argument("--kl-divergence", metavar="FILE",
                    help="compare this model with the KL base saved in FILE")
    p.add_argument("--kl-top-k", type=positive_int, default=None, metavar="K",
                   help="log-probabilities kept per position in the base (default 64)")
    p.set_defaults(run=run, parser=p)


def _running(c: int, value: float) -> None:
    sys.stdout.write(f"{',' if c else ''}[{c + 1}]{value:.4f}")
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    from pyllm.atomic import check_destination
    from pyllm.runtime.llm import LLM
    from pyllm.tools import perplexity as pp

    parser: argparse.ArgumentParser = args.parser
    if args.file is None and not args.kl_divergence:
        parser.error("give the text to score with -f/--file")
    if args.kl_top_k is not None and not args.kl_divergence_base:
        parser.error("--kl-top-k only applies with --kl-divergence-base")
    text = None
    if args.file is not None:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            # the flag is well formed; the file is bad input (exit 1, not a usage error)
            raise pp.PerplexityError(f"cannot read text file {args.file}: {e}") from None
    if args.kl_divergence_base:
        # before scoring the whole text, not when the result is to be saved
        check_destination(args.kl_divergence_base, error=pp.PerplexityError)

    base = pp.KLBase.load(args.kl_divergence) if args.kl_divergence else None
    if base is not None and args.ctx_size is not None and args.ctx_size != base.n_ctx:
        raise pp.PerplexityError(f"the KL base was saved with -c {base.n_ctx}, not "
                                 f"{args.ctx_size}")
    n_ctx = base.n_ctx if base is not None else (args.ctx_size or 512)
    llm = LLM(args.model, n_ctx=n_ctx, n_threads=args.threads,
              n_batch=min(args.batch_size, n_ctx), n_gpu_layers=args.n_gpu_layers,
              device=args.device, lora=lora_specs(args.parser, args), pipeline=args.pipeline)
    tokens = pp.tokenize_text(llm, text) if text is not None else None
    out = sys.stdout
    if base is not None:
        out.write(f"KL divergence against {args.kl_divergence}: {base.tokens.size // n_ctx} "
                  f"chunks of {n_ctx} tokens, top-{base.top_k} base\nrunning mean KL: ")
        r = pp.kl_divergence(llm, base, tokens, on_chunk=_running)
        out.write("\n")
        out.write(f"tokens scored:        {r.n_scored} ({r.seconds:.1f} s)\n")
        out.write(f"PPL(model):           {r.ppl:.4f}\n")
        out.write(f"PPL(base):            {r.ppl_base:.4f}\n")
        out.write(f"PPL ratio:            {r.ppl_ratio:.6f} +/- {r.ppl_ratio * r.ln_ratio_err:.6f}"
                  f"  (mean ln ratio {r.ln_ratio:.6f} +/- {r.ln_ratio_err:.6f})\n")
        out.write(f"mean KL divergence:   {r.kl_mean:.6f} +/- {r.kl_err:.6f}\n")
        out.write(f"median / 99% / max:   {r.kl_median:.6f} / {r.kl_p99:.6f} / {r.kl_max:.6f}\n")
        out.write(f"top-1 agreement:      {100 * r.top1:.3f} +/- {100 * r.top1_err:.3f} %\n")
        return 0
    assert tokens is not None
    out.write(f"perplexity: {tokens.size} tokens, {tokens.size // n_ctx} chunks of {n_ctx}, "
              f"scoring the second half of each\n")
    if args.kl_divergence_base:
        res = pp.save_kl_base(llm, tokens, n_ctx, args.kl_divergence_base,
                              top_k=args.kl_top_k or pp.DEFAULT_TOP_K, on_chunk=_running)
    else:
        res = pp.perplexity(llm, tokens, n_ctx, on_chunk=_running)
    out.write("\n")
    out.write(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.ppl_err:.5f} "
              f"({res.n_scored} tokens scored, {res.seconds:.1f} s)\n")
    if args.kl_divergence_base:
        out.write(f"saved the KL base to {args.kl_divergence_base}\n")
    return 0
