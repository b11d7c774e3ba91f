"""Regenerate tests/data/llamacpp_lora_figures.json: llama.cpp's logits with a pyllm LoRA adapter.

tests/test_lora.py::test_llama_cpp_applies_our_adapter_as_we_do compares pyllm's logits with
these figures, so CI needs no llama.cpp. To redo them, with llama-cpp-python anywhere on
PYTHONPATH (see make_llamacpp_quant_figures.py for installing it), from the repository root::

    PYTHONPATH=/tmp/llcpp python tests/data/make_llamacpp_lora_figures.py

The inputs are deterministic (tests.test_lora.lora_figure_inputs): SmolLM2-135M-Instruct Q4_1
requantized to F32 by pyllm (an F32 base keeps llama.cpp's int8 activation rounding out of the
comparison) and a random F32 adapter (seed 3, rank 8, every block matrix) written by
tests.test_lora.write_random_adapter. llama.cpp loads the adapter through llama-cpp-python's
``lora_path``; the figures are the last token's logits of a fixed prompt for the base and with
the adapter: the 64 largest of each (ids and values).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.test_lora import LORA_FIGURES, LORA_PROMPT, lora_figure_inputs  # noqa: E402


def main() -> int:
    import llama_cpp

    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = lora_figure_inputs(Path(tmp))
        out: dict[str, object] = {"llama_cpp_python": llama_cpp.__version__,
                                  "prompt": LORA_PROMPT}
        for name, kw in (("base", {}), ("lora", {"lora_path": str(adapter)})):
            llm = llama_cpp.Llama(model_path=str(base), n_ctx=64, logits_all=True,
                                  verbose=False, n_threads=2, **kw)
            llm.eval(LORA_PROMPT)
            logits = np.array(llm.scores[len(LORA_PROMPT) - 1], dtype=np.float64)
            top = np.argsort(-logits, kind="stable")[:64]
            out[name] = {"ids": [int(i) for i in top],
                         "logits": [round(float(logits[i]), 5) for i in top]}
            del llm
    LORA_FIGURES.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {LORA_FIGURES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
