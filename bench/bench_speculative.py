#!/usr/bin/env python3
"""Speculative decoding against plain decoding: tokens/s of the reply and acceptance rates.

    python bench/bench_speculative.py [-m model.gguf] [--draft-model small.gguf] [-n 160]
                                      [-t THREADS] [--rounds 3] [--draft-max 16]

Tasks whose replies should copy their input (fix the typos in a paragraph, repeat it, quote a
sentence of it, rewrite code with one change) as chat prompts, greedy. Per task and round:
plain, prompt lookup (``NgramDrafter``) and, with ``--draft-model``, the draft model; the
replies must be the same tokens (checked). Reported: the median tokens/s of the reply (prompt
excluded), the ratio to plain, the drafted tokens kept. A tool for people, not part of the test
suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

PARAGRAPH = ("The quick brown fox jumps over the lazy dog. Every morning the fox runs through the "
             "forest, past the old mill and across the river, before it returns to its den under "
             "the big oak tree. The dog sleeps all day in the sun and never notices the fox. In "
             "the evening the farmer comes home, feeds the dog and counts his chickens, and the "
             "fox waits in the tall grass until the lights of the house go out.")
TYPOS = (PARAGRAPH.replace("jumps", "jumsp").replace("forest", "forrest")
         .replace("river", "rivr").replace("chickens", "chikens"))
CODE = '''def total(values):
    """Add up the values, skipping None."""
    result = 0
    for v in values:
        if v is None:
            continue
        result += v
    return result
'''
TASKS = {
    "fix typos": "Fix the typos in this paragraph and write out the corrected paragraph:\n\n"
                 + TYPOS,
    "repeat": f"Repeat the following paragraph word for word:\n\n{PARAGRAPH}",
    "quote": f"{PARAGRAPH}\n\nCopy the last sentence of the text above.",
    "code, one change": f"Rewrite this Python function with its name changed to add_all:\n\n{CODE}",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="target GGUF model (default: the default model)")
    ap.add_argument("--draft-model", help="a smaller model of the same vocabulary")
    ap.add_argument("-n", type=int, default=160, help="reply tokens at most (160)")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--draft-max", type=int, default=16)
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pyllm.runtime.completions import make_generation
    from pyllm.runtime.default_model import resolve_model_path
    from pyllm.runtime.generation import chat_prompt
    from pyllm.runtime.llm import LLM
    from pyllm.runtime.speculative import DraftModel, NgramDrafter

    model = Path(args.model) if args.model else resolve_model_path(None)
    llm = LLM(model, n_ctx=1024, n_threads=args.threads)
    drafters: dict[str, Any] = {"plain": None, "ngram": NgramDrafter(draft_max=args.draft_max)}
    if args.draft_model:
        drafters["draft model"] = DraftModel(args.draft_model, n_ctx=1024,
                                             n_threads=args.threads, draft_max=args.draft_max)
    print(f"target {model.name}, {llm.n_threads} threads"
          + (f", draft model {Path(args.draft_model).name}" if args.draft_model else ""))
    print("\n| task | drafter | reply tokens | tokens/s | vs plain | drafted | kept |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for task, content in TASKS.items():
        tokens, stops = chat_prompt(llm, [{"role": "user", "content": content}], None)
        rates: dict[str, list[float]] = {name: [] for name in drafters}
        stats: dict[str, tuple[int, int]] = {}
        replies: dict[str, list[int]] = {}
        for _ in range(args.rounds):
            for name, drafter in drafters.items():
                llm.reset()
                llm.eval_prompt(tokens)  # the prompt is not what is measured
                gen = make_generation(llm, tokens, max_tokens=args.n, stop=None,
                                      extra_stop=stops, temperature=0.0, drafter=drafter)
                t0 = time.perf_counter()
                for _piece in gen:
                    pass
                dt = time.perf_counter() - t0
                rates[name].append(len(gen.tokens) / dt)
                stats[name] = (gen.spec.drafted, gen.spec.accepted)
                replies[name] = gen.tokens
        if any(r != replies["plain"] for r in replies.values()):
            print(f"error: the replies of {task!r} differ between drafters", file=sys.stderr)
            return 1
        base = statistics.median(rates["plain"])
        for name in drafters:
            rate = statistics.median(rates[name])
            drafted, kept = stats[name]
            kept_pct = f"{100 * kept / drafted:.0f} %" if drafted else "-"
            print(f"| {task} | {name} | {len(replies[name])} | {rate:.1f} | {rate / base:.2f} "
                  f"| {drafted} | {kept_pct} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
