"""Regenerate tests/data/llamacpp_iquant_figures.json: llama.cpp's i-quant quantizer's bytes.

tests/test_iquants.py::test_quantizer_writes_llama_cpps_bytes compares pyllm's quantizer with
these figures, so CI needs no llama.cpp. The script calls ggml_quantize_chunk from the
libggml-base that llama-cpp-python ships, on the deterministic inputs of
tests.test_iquants.iquant_inputs (for IQ3_S without the first row: figure_input), without an
importance matrix (PLAIN_QUANTS) and with the deterministic one of
tests.test_iquants.iquant_importance (IMATRIX_IQUANTS, keys "<TYPE>+imatrix"), for the grid
types of EDGE_IQUANTS also on tests.test_iquants.iquant_edge_inputs (keys "edge:<input>", with
their own importance), and records the SHA-256 of each output. From the repository
root, with llama-cpp-python installed under /tmp/llcpp (see make_llamacpp_quant_figures.py)::

    python tests/data/make_llamacpp_iquant_figures.py /tmp/llcpp/llama_cpp/lib/libggml-base.so
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.test_iquants import (  # noqa: E402
    EDGE_IQUANTS,
    IMATRIX_IQUANTS,
    IQUANT_FIGURES,
    PLAIN_QUANTS,
    figure_input,
    iquant_edge_inputs,
    iquant_importance,
    iquant_inputs,
)

GGML_TYPE_IDS = {"IQ4_NL": 20, "IQ4_XS": 23, "IQ2_XXS": 16, "IQ2_XS": 17, "IQ2_S": 22,
                 "IQ3_XXS": 18, "IQ3_S": 21, "IQ1_S": 19, "IQ1_M": 29, "Q4_0": 2, "Q4_1": 3,
                 "Q5_0": 6, "Q5_1": 7, "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
BLOCK = {"IQ4_NL": (32, 18), "IQ4_XS": (256, 136), "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74),
         "IQ2_S": (256, 82), "IQ3_XXS": (256, 98), "IQ3_S": (256, 110), "IQ1_S": (256, 50),
         "IQ1_M": (256, 56), "Q4_0": (32, 18), "Q4_1": (32, 20),
         "Q5_0": (32, 22), "Q5_1": (32, 24), "Q2_K": (256, 84), "Q3_K": (256, 110),
         "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    lib = ctypes.CDLL(argv[0])
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    def sha(name: str, x: np.ndarray, importance: np.ndarray | None) -> str:
        rows, k = x.shape
        bs, ts = BLOCK[name]
        dst = np.zeros(rows * k // bs * ts, np.uint8)
        x = np.ascontiguousarray(x)
        w = None if importance is None else np.ascontiguousarray(importance)
        lib.ggml_quantize_chunk(GGML_TYPE_IDS[name], x.ctypes.data, dst.ctypes.data, 0, rows, k,
                                None if w is None else w.ctypes.data)
        return hashlib.sha256(dst.tobytes()).hexdigest()

    out: dict[str, dict[str, str]] = {}
    jobs = [(name, name, False) for name in PLAIN_QUANTS]
    jobs += [(f"{name}+imatrix", name, True) for name in IMATRIX_IQUANTS]
    for label, name, guided in jobs:
        out[label] = {}
        for key, x in iquant_inputs().items():
            out[label][key] = sha(name, figure_input(name, x),
                                  iquant_importance() if guided else None)
        if name in EDGE_IQUANTS:
            for key, (x, w) in iquant_edge_inputs().items():
                out[label][f"edge:{key}"] = sha(name, x, w if guided else None)
    IQUANT_FIGURES.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {IQUANT_FIGURES}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
