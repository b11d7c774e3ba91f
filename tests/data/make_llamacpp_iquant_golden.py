"""Regenerate tests/data/llamacpp_iquants/: a tiny model llama.cpp's own quantizer wrote in every
i-quant and ternary type, and llama.cpp's logits for it.

tests/test_iquants_grid.py::test_llama_cpp_quantized_file_loads loads the file in pyllm and
compares with the figures, so CI needs no llama.cpp. The source is ``GOLDEN_SPEC`` (a random
2-layer Llama, 256 wide, no tokenizer: ``tokenizer.ggml.model = "none"``), the importance
matrix ``synthetic_imatrix`` of tests/test_quantize_imatrix.py (llama.cpp refuses the IQ2/IQ1
types without one). ``llama-quantize`` gets one grid type per matrix of layer 0
(``GOLDEN_TYPES``), IQ4_NL for layer 1's attn_q, IQ4_XS for the rest, TQ1_0 for the embeddings
and TQ2_0 for the output. The figures are llama.cpp's (through llama-cpp-python's low-level API)
top-1 token and largest logit at each of ``GOLDEN_TOKENS``' positions. Build llama.cpp's tools as
tests/data/make_llamacpp_imatrix_golden.py says, install llama-cpp-python anywhere on PYTHONPATH
(see make_llamacpp_quant_figures.py), then from the repository root::

    PYTHONPATH=/tmp/llcpp python tests/data/make_llamacpp_iquant_golden.py \\
        /tmp/llcpp-build/bin/llama-quantize

The llama.cpp used last: the one vendored by llama-cpp-python 0.3.36.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pyllm.formats.imatrix import write_imatrix  # noqa: E402
from tests.test_iquants_grid import (  # noqa: E402
    GOLDEN_FIGURES,
    GOLDEN_IQ,
    GOLDEN_TOKENS,
    GOLDEN_TYPES,
    golden_source,
)
from tests.test_quantize_imatrix import synthetic_imatrix  # noqa: E402


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    import llama_cpp as lc

    lc.llama_backend_init()
    mparams = lc.llama_model_default_params()
    model = lc.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise SystemExit(f"llama.cpp could not load {path}")
    cparams = lc.llama_context_default_params()
    cparams.n_ctx = 128
    cparams.n_batch = cparams.n_ubatch = len(tokens)
    cparams.n_threads = cparams.n_threads_batch = 2
    ctx = lc.llama_init_from_model(model, cparams)
    batch = lc.llama_batch_init(len(tokens), 0, 1)
    for i, t in enumerate(tokens):
        batch.token[i] = t
        batch.pos[i] = i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = True
    batch.n_tokens = len(tokens)
    if lc.llama_decode(ctx, batch) != 0:
        raise SystemExit("llama_decode failed")
    n_vocab = 160
    out = np.array([np.ctypeslib.as_array(
        ctypes.cast(lc.llama_get_logits_ith(ctx, i), ctypes.POINTER(ctypes.c_float)),
        shape=(n_vocab,)) for i in range(len(tokens))], dtype=np.float32)
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    lc.llama_model_free(model)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_file():
        print(__doc__, file=sys.stderr)
        return 2
    import llama_cpp

    GOLDEN_IQ.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = golden_source(Path(tmp) / "src.gguf")
        imatrix = Path(tmp) / "imatrix.gguf"
        write_imatrix(synthetic_imatrix(src), imatrix)
        args = [argv[0], "--imatrix", str(imatrix), "--token-embedding-type", "tq1_0",
                "--output-tensor-type", "tq2_0"]
        for name, t in GOLDEN_TYPES.items():
            args += ["--tensor-type", f"{name.replace('.', chr(92) + '.')}={t.lower()}"]
        subprocess.run([*args, str(src), str(GOLDEN_IQ), "IQ4_XS", "2"], check=True,
                       capture_output=True)
    logits = llama_cpp_logits(GOLDEN_IQ, GOLDEN_TOKENS)
    GOLDEN_FIGURES.write_text(json.dumps({
        "llama_cpp_python": llama_cpp.__version__,
        "top1": [int(i) for i in logits.argmax(-1)],
        "max_logit": [round(float(v), 5) for v in logits.max(-1)],
    }, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN_IQ} ({GOLDEN_IQ.stat().st_size} bytes) and {GOLDEN_FIGURES}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
