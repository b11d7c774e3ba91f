"""Regenerate tests/data/llamacpp_quant_figures.json from llama.cpp's own quantizer.

tests/test_quantize.py::test_matches_llama_cpp_quantizer compares pyllm's quantizer with these
figures, so CI needs no llama.cpp. To redo them (after a change to the inputs or to compare with
another llama.cpp), install llama-cpp-python (it builds llama.cpp from source, several minutes)
anywhere on PYTHONPATH, then from the repository root::

    pip install --no-deps --target /tmp/llcpp llama-cpp-python diskcache
    PYTHONPATH=/tmp/llcpp python tests/data/make_llamacpp_quant_figures.py

For each input model of ``figure_inputs`` (deterministic: built from seeds) and each file type,
it runs ``llama_model_quantize`` and records ``quant_digest`` of the result. It also quantizes
the same inputs with pyllm and exits 1, listing the differences, if they disagree: a fresh run
is a live byte comparison with llama.cpp.
"""

from __future__ import annotations

import ctypes
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pyllm.tools.quantize import FILE_TYPES, quantize_file  # noqa: E402
from tests.test_quantize import FIGURES, figure_inputs, file_sha256, quant_digest  # noqa: E402


def llama_cpp_quantize(llama_cpp: object, src: Path, dst: Path, ftype: int) -> None:
    lc = llama_cpp
    params = lc.llama_model_quantize_default_params()  # type: ignore[attr-defined]
    params.ftype = ftype
    params.nthread = 2
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(),  # type: ignore[attr-defined]
                                 ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc}) for {src} -> {dst}")


def main() -> int:
    import llama_cpp

    out: dict[str, object] = {
        "_about": "SHA-256 digests (tests/test_quantize.py quant_digest) of the files llama.cpp's "
                  "llama_model_quantize writes from the inputs of figure_inputs, per file type. "
                  "Made by tests/data/make_llamacpp_quant_figures.py.",
        "llama_cpp_python": llama_cpp.__version__,
        "models": {},
    }
    differences = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for model, src in figure_inputs(folder).items():
            types: dict[str, object] = {}
            for name, ft in FILE_TYPES.items():
                if ft.needs_imatrix:  # tests/data/make_llamacpp_imatrix_quant_figures.py
                    continue
                theirs = folder / f"{model}-{name}-llama.gguf"
                ours = folder / f"{model}-{name}-pyllm.gguf"
                llama_cpp_quantize(llama_cpp, src, theirs, ft.ftype)
                quantize_file(src, ours, name, threads=2, progress=False)
                types[name] = quant_digest(theirs)
                if quant_digest(ours) != types[name]:
                    differences.append(f"{model} {name}: pyllm {quant_digest(ours)} "
                                       f"llama.cpp {types[name]}")
                theirs.unlink()
                ours.unlink()
            out["models"][model] = {"input_sha256": file_sha256(src),  # type: ignore[index]
                                    "types": types}
    FIGURES.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {FIGURES}")
    for line in differences:
        print("differs:", line, file=sys.stderr)
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
