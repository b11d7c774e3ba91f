"""What of a model's GGUF file stays resident in the process that runs it (read from
/proc/self/pagemap: Linux). After a load the file's pages are handed back (the header is parsed,
the norm vectors copied, the matrices in the repack image) and the embedding rows are read from
the file (csrc/model/embedding_file.h), so a generation maps nothing of the file back in."""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads pagemap")

PAGE = 4096
PROMPT = "The history of the city begins with"


def address(buf: memoryview) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def resident_kb(buf: memoryview) -> int:
    """KB of this process's pages present where ``buf`` lies (only this mapping's addresses:
    other mappings of the same file, open in this process, are not counted)."""
    start = address(buf)
    first, last = start // PAGE, (start + len(buf) + PAGE - 1) // PAGE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = struct.unpack(f"{last - first}Q", f.read((last - first) * 8))
    return sum(PAGE // 1024 for e in entries if e >> 63)


def open_fds(path: Path) -> int:
    """This process's descriptors of ``path``."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}") == str(path)
    return n


def spread_tokens(n_vocab: int) -> list[int]:
    """Rows in every 2 MiB of SmolLM2's 17.7 MB table (a fault maps up to a 2 MiB folio)."""
    return list(range(7, n_vocab, n_vocab // 24))


def generate(llm) -> np.ndarray:  # type: ignore[no-untyped-def]
    """A prompt, three greedy tokens, then tokens from all over the table; the last logits."""
    ids = llm.tokenizer.encode(PROMPT, add_special=True)
    logits = llm.eval_prompt(ids)
    for _ in range(3):
        logits = llm.eval_token(int(logits.argmax()))
    spread = spread_tokens(llm.n_vocab)
    llm.eval_prompt(ids + spread)
    for t in spread:
        logits = llm.eval_token(t)
    return np.array(logits)


def test_a_generation_keeps_nothing_of_the_file(smollm2_path: Path) -> None:
    from pyllm import LLM

    with LLM(smollm2_path, n_ctx=256) as llm:
        reader = llm.model._reader
        file = reader._buf  # the mapping this model runs from
        llm.tokenizer.encode(PROMPT)
        assert resident_kb(file) == 0  # loaded, tokenizer built: nothing

        generate(llm)
        assert resident_kb(file) == 0  # generated: still nothing

        # controls: what the measurement sees when rows of the table and the norm vectors are
        # read through the same mapping
        table = reader.tensor("token_embd.weight")
        row = len(table.view) // llm.n_vocab
        spread = spread_tokens(llm.n_vocab)
        for t in spread:
            bytes(table.view[t * row:(t + 1) * row])
        assert resident_kb(table.view) >= len(spread) * PAGE // 1024
        norms = [t for t in reader.tensors if t.name.endswith("norm.weight")]
        for t in norms:
            bytes(t.view)
        assert all(resident_kb(t.view) > 0 for t in norms)


def test_rows_read_from_the_file_equal_the_mapped_rows(
        smollm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyllm import LLM
    from pyllm.formats.gguf import reader as reader_module

    path = smollm2_path.resolve()
    before = open_fds(path)
    with LLM(smollm2_path, n_ctx=256) as llm:
        assert open_fds(path) == before + 2  # the mapping's descriptor and the model's
        from_file = generate(llm)
    del llm
    gc.collect()
    assert open_fds(path) == before  # both closed with the model

    # a file that changed on disk since it was mapped is not read: the rows come from the
    # mapping, and give the same logits bit for bit
    calls = itertools.count()
    monkeypatch.setattr(reader_module, "file_identity", lambda st: next(calls))
    with LLM(smollm2_path, n_ctx=256) as llm:
        assert llm.model._reader.open_tensor_file("token_embd.weight") is None
        assert open_fds(path) == before + 1  # the mapping's only
        from_map = generate(llm)
        assert resident_kb(llm.model._reader._buf) > 0  # control: these rows were mapped
    np.testing.assert_array_equal(from_file, from_map)


def test_open_tensor_file(smollm2_path: Path, tmp_path: Path) -> None:
    from pyllm.errors import GGUFError
    from pyllm.formats.gguf import GGUFReader

    copy = tmp_path / "m.gguf"
    copy.write_bytes(smollm2_path.read_bytes())
    reader = GGUFReader(copy)
    table = reader.tensor("token_embd.weight")
    opened = reader.open_tensor_file("token_embd.weight")
    assert opened is not None
    fd, offset = opened
    try:
        assert offset == table.offset
        assert os.pread(fd, 4096, offset) == bytes(table.view[:4096])
    finally:
        os.close(fd)
    with pytest.raises(GGUFError, match="no tensor named 'nope'"):
        reader.open_tensor_file("nope")
    os.utime(copy, ns=(0, 0))  # written since it was mapped, as far as the file can tell
    assert reader.open_tensor_file("token_embd.weight") is None
    copy.unlink()  # gone
    assert reader.open_tensor_file("token_embd.weight") is None
    reader.close()
