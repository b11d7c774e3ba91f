"""Regenerate tests/data/llamacpp_imatrix_quant_figures.json: llama.cpp's quantizer guided by an
importance matrix pyllm wrote.

tests/test_quantize_imatrix.py compares pyllm's output with these figures, so CI needs no
llama.cpp. The model is test_quantize's 8-layer one (``figure_inputs``), the importance matrix
``synthetic_imatrix`` (written by pyllm's GGUF imatrix writer; llama-quantize reads it). For
each file type of IMATRIX_TYPES it runs ``llama-quantize --imatrix`` and records the digest of
its tensors (types and bytes), then quantizes the same with pyllm and exits 1 if they differ;
the same for the i-quant mixes (GQA4_TYPES) on ``gqa4_model`` (key "gqa4").
Build llama.cpp's tools as tests/data/make_llamacpp_imatrix_golden.py says, then from the
repository root::

    python tests/data/make_llamacpp_imatrix_quant_figures.py /tmp/llcpp-build/bin/llama-quantize

The llama.cpp used last: the one vendored by llama-cpp-python 0.3.36.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pyllm.formats.imatrix import write_imatrix  # noqa: E402
from pyllm.tools.quantize import quantize_file  # noqa: E402
from tests.test_quantize import figure_inputs, file_sha256, quant_digest  # noqa: E402
from tests.test_quantize_imatrix import (  # noqa: E402
    FIGURES,
    GQA4_TYPES,
    IMATRIX_TYPES,
    gqa4_model,
    synthetic_imatrix,
)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_file():
        print(__doc__, file=sys.stderr)
        return 2
    out: dict[str, object] = {
        "_about": "tests/test_quantize.py quant_digest (without the file size) of "
                  "llama-quantize --imatrix output; made by "
                  "tests/data/make_llamacpp_imatrix_quant_figures.py",
        "types": {},
    }
    bad = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        gqa4: dict[str, object] = {"types": {}}
        for model, names, record in ((figure_inputs(folder)["tiny8"], IMATRIX_TYPES, out),
                                     (gqa4_model(folder), GQA4_TYPES, gqa4)):
            imatrix = folder / f"{model.stem}-imatrix.gguf"
            write_imatrix(synthetic_imatrix(model), imatrix)
            record["input_sha256"] = file_sha256(model)
            record["imatrix_sha256"] = file_sha256(imatrix)
            for name in names:
                theirs, ours = folder / f"{name}-llama.gguf", folder / f"{name}-pyllm.gguf"
                subprocess.run([argv[0], "--imatrix", str(imatrix), str(model), str(theirs),
                                name, "2"], check=True, capture_output=True)
                digest = quant_digest(theirs)
                digest.pop("file_size")  # the metadata names the imatrix file's (temp) path
                record["types"][name] = digest  # type: ignore[index]
                quantize_file(model, ours, name, threads=2, progress=False, imatrix=imatrix)
                mine = quant_digest(ours)
                mine.pop("file_size")
                if mine != digest:
                    bad.append(f"{model.stem} {name}")
        out["gqa4"] = gqa4
    FIGURES.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {FIGURES}")
    if bad:
        print(f"pyllm differs from llama.cpp for: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
