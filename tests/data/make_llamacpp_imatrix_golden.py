"""Regenerate tests/data/llamacpp_imatrix/: importance matrices written by llama.cpp's own
``llama-imatrix``, in its GGUF and its legacy .dat format.

tests/test_imatrix.py reads these and writes them back byte for byte, so CI needs no llama.cpp.
The model is ``tests.test_imatrix.vocab_model`` (a tiny random Llama with SmolLM2's tokenizer,
deterministic), the text the first GOLDEN_CHUNKS chunks of GOLDEN_CTX tokens of
tests/data/english.txt, one thread (so both runs compute the same sums). To redo them, build
llama.cpp's tools from its sources (llama-cpp-python's sdist carries them under
``vendor/llama.cpp``), then from the repository root::

    cmake -G Ninja -S "$LLAMA_CPP" -B /tmp/llcpp-build -DCMAKE_BUILD_TYPE=Release \\
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF
    ninja -C /tmp/llcpp-build llama-imatrix
    python tests/data/make_llamacpp_imatrix_golden.py /tmp/llcpp-build/bin/llama-imatrix

The llama.cpp used last: the one vendored by llama-cpp-python 0.3.36.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pyllm.runtime.default_model import ensure_model  # noqa: E402
from tests.test_imatrix import (  # noqa: E402
    GOLDEN,
    GOLDEN_CHUNKS,
    GOLDEN_CTX,
    GOLDEN_DAT,
    GOLDEN_GGUF,
    vocab_model,
)

TEXT = "tests/data/english.txt"  # relative: llama-imatrix stores the path as the dataset name


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_file():
        print(__doc__, file=sys.stderr)
        return 2
    GOLDEN.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = vocab_model(ensure_model(quiet=True), Path(tmp) / "vocab-tiny.gguf")
        for out, fmt in ((GOLDEN_GGUF, "gguf"), (GOLDEN_DAT, "dat")):
            subprocess.run([argv[0], "-m", str(model), "-f", TEXT, "-c", str(GOLDEN_CTX),
                            "--chunks", str(GOLDEN_CHUNKS), "-t", "1", "--no-ppl",
                            "--output-format", fmt, "-o", str(out)],
                           check=True, cwd=ROOT, capture_output=True)
            print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
