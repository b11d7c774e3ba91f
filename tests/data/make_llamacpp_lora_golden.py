"""Regenerate tests/data/llamacpp_lora/*.gguf: llama.cpp's own LoRA converter's output.

tests/test_lora.py::test_pyllm_loads_llama_cpp_converter_output loads these adapters into pyllm,
so CI needs no llama.cpp. They are what ``convert_lora_to_gguf.py`` (plain Python, in the
llama.cpp sources; llama-cpp-python's sdist carries them under ``vendor/llama.cpp``) writes for
the PEFT adapters of tests/test_lora.py (``make_peft``: the tiny random Llama and Qwen2, rank 8,
alpha 16, all seven block matrices; deterministic from torch seeds) with ``--outtype f16``.
To redo them, from the repository root, with torch, transformers and peft installed::

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llcpp-src
    tar xf /tmp/llcpp-src/llama_cpp_python-*.tar.gz -C /tmp/llcpp-src
    LLAMA_CPP=$(echo /tmp/llcpp-src/llama_cpp_python-*/vendor/llama.cpp)
    python tests/data/make_llamacpp_lora_golden.py "$LLAMA_CPP"

The llama.cpp used last: the one vendored by llama-cpp-python 0.3.36 (its gguf-py beside it).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.test_convert_hf import make_model  # noqa: E402
from tests.test_lora import CASES, LLAMACPP_LORA, make_peft  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    script = Path(argv[0]) / "convert_lora_to_gguf.py"
    if not script.is_file():
        print(f"error: {script} not found", file=sys.stderr)
        return 1
    LLAMACPP_LORA.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kind, overrides) in CASES.items():
            base, adapter = Path(tmp) / f"{name}-base", Path(tmp) / f"{name}-adapter"
            make_model(kind, overrides).save_pretrained(base)
            make_peft(kind, overrides).save_pretrained(adapter)
            out = LLAMACPP_LORA / f"{name}.gguf"
            subprocess.run([sys.executable, str(script), "--base", str(base), "--outtype", "f16",
                            "--outfile", str(out), str(adapter)], check=True)
            print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
