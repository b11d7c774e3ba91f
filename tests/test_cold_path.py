"""A cold `pyllm run` reaches its text without numpy (importing it is 45-90 ms, a third of the
time to the first token on a small model): the run, greedy and sampled, in a process where
importing numpy fails, gives the text a normal process gives; a command that does need numpy
fails there (the control: the block works). And what that path reads instead of numpy views:
the GGUF reader's typed memoryviews, the same numbers as its numpy metadata."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pyllm.formats.gguf import GGUFReader, GGUFWriter, ValueType

# Runs the CLI with every import of numpy failing.
_BLOCKED = """
import sys
class _NoNumpy:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" or name.startswith("numpy."):
            raise ImportError("numpy is blocked in this process")
        return None
sys.meta_path.insert(0, _NoNumpy())
from pyllm.cli import main
sys.exit(main(sys.argv[1:]))
"""
_PLAIN = "import sys\nfrom pyllm.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def _cli(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.mark.parametrize("sampling", [["--temp", "0"], ["--temp", "0.8", "--seed", "7"]],
                         ids=["greedy", "sampled"])
def test_run_needs_no_numpy(smollm2_path: Path, tmp_path: Path, sampling: list[str]) -> None:
    args = ["run", "-m", str(smollm2_path), "-p", "The history of the city", "-n", "12",
            *sampling]
    blocked = _cli(_BLOCKED, *args, cwd=tmp_path)
    assert blocked.returncode == 0, blocked.stderr
    plain = _cli(_PLAIN, *args, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert blocked.stdout == plain.stdout
    assert len(blocked.stdout) > len("The history of the city") + 5


def test_the_block_fails_a_command_that_needs_numpy(smollm2_path: Path, tmp_path: Path) -> None:
    proc = _cli(_BLOCKED, "info", str(smollm2_path), cwd=tmp_path)
    assert proc.returncode == 1
    assert "numpy is blocked" in proc.stderr


def test_fields_are_the_metadata_numbers(tmp_path: Path) -> None:
    path = tmp_path / "arrays.gguf"
    values = {
        "a.i32": (np.array([-3, 0, 7], np.int32), ValueType.INT32),
        "a.u8": (np.array([0, 255], np.uint8), ValueType.UINT8),
        "a.f32": (np.array([0.1, -2.5], np.float32), ValueType.FLOAT32),
        "a.f64": (np.array([1e-300, 3.0], np.float64), ValueType.FLOAT64),
        "a.u64": (np.array([2**63 + 1], np.uint64), ValueType.UINT64),
        "a.bool": (np.array([True, False, True]), ValueType.BOOL),
    }
    w = GGUFWriter(path)
    for key, (arr, vtype) in values.items():
        w.add_kv(key, arr, ValueType.ARRAY, vtype)
    w.add_kv("s.eps", 1e-5, ValueType.FLOAT32)
    w.add_kv("a.nested", [np.array([1, 2], np.int32), np.array([3], np.int32)],
             ValueType.ARRAY, ValueType.ARRAY)
    w.write()
    r = GGUFReader(path)
    for key, (arr, _) in values.items():
        field, meta = r.fields[key], r.metadata[key]
        assert isinstance(field, memoryview) and field.readonly
        assert isinstance(meta, np.ndarray)
        # zero-copy views of the read-only mapping; bools a normalised copy (as before)
        assert meta.flags.writeable == (key == "a.bool"), key
        assert meta.dtype == arr.dtype, key
        assert field.tolist() == meta.tolist() == arr.tolist(), key
    assert r.fields["a.bool"].format == "?"
    nested = r.metadata["a.nested"]
    assert [x.tolist() for x in nested] == [[1, 2], [3]]
    assert [type(x) for x in r.fields["a.nested"]] == [memoryview, memoryview]
    assert r.get("a.i32").tolist() == [-3, 0, 7] and r.get("s.eps") == 1e-05
    assert r.get("missing", 5) == 5


@pytest.mark.parametrize("value", [1e-5, 1e-6, 0.1, 3.0, 1e38, 5e-324, -0.0, 10000.0, 1 / 3,
                                   math.inf, 123456.789])
def test_float32_scalars_read_as_their_shortest_decimal(tmp_path: Path, value: float) -> None:
    path = tmp_path / "f.gguf"
    w = GGUFWriter(path)
    w.add_kv("x", value, ValueType.FLOAT32)
    w.write()
    got = GGUFReader(path).fields["x"]
    stored = struct.unpack("<f", struct.pack("<f", value))[0]
    assert got == float(str(np.float32(stored)))  # numpy's shortest repr of the float32
    assert struct.unpack("<f", struct.pack("<f", got))[0] == stored


def test_the_decode_loop_logits_are_the_public_ones(smollm2_path: Path) -> None:
    from pyllm import LLM
    from pyllm.errors import ContextError, ModelError

    with LLM(smollm2_path, n_ctx=32) as llm:
        prompt = llm.tokenize("The capital of France is")
        fast = np.asarray(llm._prompt_logits(prompt))
        assert isinstance(llm._last_logits, memoryview)
        step = np.asarray(llm._token_logits(int(fast.argmax())))
        llm.reset()
        assert np.array_equal(llm.eval_prompt(prompt), fast)  # bit for bit
        assert np.array_equal(llm.eval_token(int(fast.argmax())), step)
        assert fast.dtype == np.float32 and fast.shape == (llm.n_vocab,)
        # the prompt's cached prefix is reused as eval_prompt does: only the new token runs
        again = np.asarray(llm._prompt_logits([*prompt, int(fast.argmax())]))
        assert np.array_equal(again, step) and llm.n_past == len(prompt) + 1
        # a saved state copies the memoryview's logits
        assert np.array_equal(llm.save_state().last_logits, step)
        with pytest.raises(ModelError, match="outside the vocabulary"):
            llm._token_logits(llm.n_vocab)
        with pytest.raises(ModelError, match="outside the vocabulary"):
            llm._prompt_logits([1, -1])
        # numpy integers take the checked numpy path, to the same logits
        llm.reset()
        assert np.array_equal(llm._prompt_logits(list(np.array(prompt, np.int64))), fast)
        with pytest.raises(ContextError, match="exceed the context size"):
            llm._prompt_logits(list(range(1, 40)))
