"""Run by tests/test_mpi.py, under ``mpirun -np N`` or as one plain process (the reference):
rank 0 drives a model through :class:`pyllm.LLM` with ``pipeline=`` and saves what it saw
(logits of a prompt in several chunks, greedy tokens, a saved state and the logits after
loading it back, the logits after a context shift) into an .npz file; the other ranks serve.

    python tests/mpi_pipeline_run.py MODEL OUT.npz [--split 1,2,1] [--text PROMPT]

``--fail-in-forward``: rank 1 raises inside its first chunk (a fault during a forward).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import pyllm


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--split", default=None)
    p.add_argument("--text", default=None, help="also generate greedy text from this prompt")
    p.add_argument("--fail-in-forward", action="store_true")
    args = p.parse_args()
    split = [int(x) for x in args.split.split(",")] if args.split else None
    pipe = pyllm.Pipeline(layer_split=split)
    if pipe.rank != 0:
        if args.fail_in_forward and pipe.rank == 1:
            import pyllm.runtime.mpi as mpi

            def fail(*_: object) -> None:
                raise RuntimeError("injected failure in a forward")

            mpi._Worker.chunk = fail  # type: ignore[method-assign]
        return pipe.serve()
    llm = pyllm.LLM(args.model, n_ctx=128, n_batch=8, n_threads=1, pipeline=pipe)
    rng = np.random.default_rng(7)
    prompt = [int(t) for t in rng.integers(0, llm.n_vocab, 29)]
    out: dict[str, object] = {"ranks": pipe.size}
    out["logits"] = llm.logits(prompt)  # 29 tokens: 4 chunks of 8 down the pipeline
    greedy = []
    logits = out["logits"][-1]  # type: ignore[index]
    for _ in range(12):
        greedy.append(int(np.argmax(logits)))
        logits = llm.eval_token(greedy[-1])
    out["greedy"] = np.array(greedy)
    state = llm.save_state()
    out["state"] = np.frombuffer(state.kv, dtype=np.uint8)
    out["after_state"] = llm.eval_token(greedy[-1])
    llm.reset()
    llm.load_state(state)
    out["after_load"] = llm.eval_token(greedy[-1])
    llm.shift_context(4, 8)
    out["after_shift"] = llm.eval_token(3)
    if args.text is not None:
        out["text"] = np.array(llm.generate(args.text, max_tokens=24, temperature=0.0))
    try:
        llm.embed(prompt[:4])
        out["embed_error"] = np.array("")
    except pyllm.PipelineError as e:
        out["embed_error"] = np.array(str(e))
    out["rss"] = np.array(pipe.peak_rss() if pipe.size > 1 else [0])
    np.savez(args.out, **out)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
