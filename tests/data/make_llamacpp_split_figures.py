"""Regenerate tests/data/llamacpp_split_figures.json: llama.cpp loading pyllm's shards.

tests/test_split.py::test_llama_cpp_loads_our_shards checks these figures, so CI needs no
llama.cpp. The script splits SmolLM2-135M-Instruct Q4_1 (the default model) with pyllm at
``tests.test_split.SMOL_SPLIT`` into a temp folder, records the shards' SHA-256, and has
llama.cpp (llama-cpp-python anywhere on PYTHONPATH; see make_llamacpp_quant_figures.py for
installing it) evaluate a fixed prompt from the unsplit file and from the first shard: the last
position's 64 largest logits of each. From the repository root::

    PYTHONPATH=/tmp/llcpp python tests/data/make_llamacpp_split_figures.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pyllm.runtime.default_model import resolve_model_path  # noqa: E402
from pyllm.tools.split import parse_size, split_model  # noqa: E402
from tests.test_split import PROMPT, SMOL_SPLIT, SPLIT_FIGURES, sha256  # noqa: E402


def top_logits(llama_cpp: object, path: Path) -> dict[str, list[float] | list[int]]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True,  # type: ignore[attr-defined]
                          verbose=False, n_threads=2)
    llm.eval(PROMPT)
    logits = np.array(llm.scores[len(PROMPT) - 1], dtype=np.float64)
    top = np.argsort(-logits, kind="stable")[:64]
    del llm
    return {"ids": [int(i) for i in top], "logits": [round(float(logits[i]), 5) for i in top]}


def main() -> int:
    import llama_cpp

    model = resolve_model_path(None)
    with tempfile.TemporaryDirectory() as tmp:
        shards = split_model(model, Path(tmp) / "smol", max_size=parse_size(SMOL_SPLIT))
        out = {"llama_cpp_python": llama_cpp.__version__, "max_size": SMOL_SPLIT,
               "prompt": PROMPT, "shard_sha256": [sha256(p) for p in shards],
               "whole": top_logits(llama_cpp, model), "split": top_logits(llama_cpp, shards[0])}
    SPLIT_FIGURES.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {SPLIT_FIGURES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
