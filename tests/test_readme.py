"""The README's Python examples run as written, from any folder (not only the repo root)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.model


def _python_blocks(section: str) -> list[str]:
    """The ```python blocks of one ``## ``/``### `` section of the README."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n{section}\n")
    nxt = re.search(r"\n#{2,3} ", text[start + len(section) + 2:])
    body = text[start: start + len(section) + 2 + nxt.start()] if nxt else text[start:]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_python_api_example(smollm2_path: Path, tmp_path: Path) -> None:
    (block,) = _python_blocks("## Python API")[:1]
    proc = _run(block, tmp_path)
    assert proc.returncode == 0, proc.stderr
    # The streamed pieces end their line, so what is printed next starts a line of its own
    # (the example once ran the chat reply into the streamed text). The stream is seeded, so
    # the same call here gives the same text.
    from pyllm.runtime.llm import LLM

    with LLM() as llm:
        streamed = "".join(llm.stream("The sea is", max_tokens=32, top_k=40, seed=1))
    assert streamed and streamed + "\n" in proc.stdout
    assert proc.stdout.endswith("\n")  # and so does the streamed chat completion at the end


def test_perplexity_example(smollm2_path: Path, tmp_path: Path) -> None:
    blocks = [b for b in _python_blocks("## Python API") if "perplexity" in b]
    assert len(blocks) == 1
    proc = _run(blocks[0], tmp_path)  # not the repo root: the example needs no repo file
    assert proc.returncode == 0, proc.stderr
    value = float(proc.stdout.split("perplexity", 1)[1])
    # a real model on plain English: far below the vocabulary size (uniform logits: 49152)
    assert math.isfinite(value) and 1.5 < value < 100, proc.stdout
