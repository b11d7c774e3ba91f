"""What of a model's GGUF file stays resident in the process that runs it (read from
/proc/self/smaps: Linux). After a load the file's pages are handed back (the header is parsed,
the norm vectors copied, the matrices in the repack image), so a generation maps in only the
embedding rows of the tokens it sees -- each with the few pages the kernel maps around a fault."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads smaps")


def resident_mb(buf: memoryview) -> float:
    """Resident MB of the mapping ``buf`` views (other tests' mappings of the same file, open in
    this process, are not counted)."""
    import numpy as np

    start = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    end, total, inside = start + len(buf), 0, False
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            head = line.split()
            if len(head) >= 5 and "-" in head[0] and ":" not in head[0]:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                inside = lo < end and hi > start
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total / 1024


def test_a_generation_keeps_only_embedding_rows_of_the_file(smollm2_path: Path) -> None:
    from pyllm import LLM

    with LLM(smollm2_path, n_ctx=64) as llm:
        file = llm.model._reader._buf  # the mapping this model runs from
        ids = llm.tokenizer.encode("The history of the city begins with", add_special=True)
        assert len(ids) <= 10
        assert resident_mb(file) < 0.1  # loaded, tokenizer built: nothing
        logits = llm.eval_prompt(ids)
        for _ in range(3):
            logits = llm.eval_token(int(logits.argmax()))
        # <= 13 embedding rows, 64 KB mapped around each: 0.44 MB here (4-6 MB before the
        # norms were copied and the header handed back)
        assert 0 < resident_mb(file) < 1.0
        # control: what the measurement sees when the norm vectors are read from the file
        for t in llm.model._reader.tensors:
            if t.name.endswith("norm.weight"):
                bytes(t.view)
        assert resident_mb(file) > 3.0
