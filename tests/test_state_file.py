"""State files (pyllm.runtime.state_file) and ``pyllm run --prompt-cache``: a saved state
continues exactly where it was saved, is bound to its model and KV type, and a truncated,
altered or foreign file is refused with a StateFileError naming the problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pyllm.errors import StateFileError
from pyllm.runtime.state_file import MAGIC, load_state_file, save_state_file

PROMPT = "Once upon a time in a small village by the sea, there lived an old fisherman who"


@pytest.fixture(scope="module")
def smol(smollm2_path: Path):  # type: ignore[no-untyped-def]
    from pyllm.runtime.llm import LLM

    with LLM(smollm2_path, n_ctx=256, n_threads=2) as llm:
        yield llm


@pytest.fixture
def saved(smol, tmp_path: Path) -> tuple[Path, list[int]]:  # type: ignore[no-untyped-def]
    tokens = smol.tokenize(PROMPT)
    smol.reset()
    smol.eval_prompt(tokens)
    path = tmp_path / "prompt.state"
    save_state_file(smol, path)
    return path, tokens


def test_a_saved_state_continues_where_it_was_saved(smol, smollm2_path: Path,  # type: ignore[no-untyped-def]
                                                     saved: tuple[Path, list[int]]) -> None:
    from pyllm.runtime.llm import LLM

    path, tokens = saved
    with LLM(smollm2_path, n_ctx=256, n_threads=2) as other:
        state = load_state_file(other, path)
        assert list(state.tokens) == tokens
        other.load_state(state)
        assert other.tokens == tokens
        nxt = smol.tokenize(" caught", add_special=False)
        got = other.eval(nxt)
    want = smol.logits(tokens + nxt)[-1]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())
    # the control: without the state the same call sees only the new token
    with LLM(smollm2_path, n_ctx=256, n_threads=2) as fresh:
        alone = fresh.eval(nxt)
    assert np.abs(alone - want).max() > 100 * np.abs(got - want).max()


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) - 1000]
    elif how == "flipped":
        data[len(data) // 2] ^= 0x40
    elif how == "magic":
        data[:len(MAGIC)] = b"GGUF\0\0\0\0"
    elif how == "version":
        data[len(MAGIC)] = 9
    elif how == "header":
        data[len(MAGIC) + 8] = ord("[")
    elif how == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,match", [
    ("truncated", "truncated"), ("flipped", "corrupt"), ("magic", "not a pyllm state file"),
    ("version", "format version 9"), ("header", "corrupt header"),
    ("empty", "not a pyllm state file"),
])
def test_damaged_files_are_refused(smol, saved: tuple[Path, list[int]], how: str,  # type: ignore[no-untyped-def]
                                   match: str) -> None:
    path, _ = saved
    load_state_file(smol, path)  # intact: loads
    _damage(path, how)
    with pytest.raises(StateFileError, match=match):
        load_state_file(smol, path)


def test_another_model_or_kv_type_is_refused(smollm2_path: Path, saved: tuple[Path, list[int]],
                                             tmp_path: Path) -> None:
    from pyllm.runtime.llm import LLM
    from tests.tiny_models import TinySpec, write_tiny

    path, _ = saved
    with LLM(write_tiny(tmp_path / "tiny.gguf", TinySpec()), n_ctx=256) as tiny, \
            pytest.raises(StateFileError, match="another model"):
        load_state_file(tiny, path)
    with LLM(smollm2_path, n_ctx=256, kv_type="f32") as f32, \
            pytest.raises(StateFileError, match="KV cache type f16"):
        load_state_file(f32, path)
    with LLM(smollm2_path, n_ctx=8) as small, \
            pytest.raises(StateFileError, match="this context holds 8"):
        load_state_file(small, path)


def test_cli_prompt_cache(smollm2_path: Path, tmp_path: Path) -> None:
    from tests.test_cli import run_cli

    cache = tmp_path / "cache.state"
    base = ("run", "-m", str(smollm2_path), "-p", PROMPT, "-n", "12", "--temp", "0", "-c", "256",
            "--verbose")
    ro = run_cli(*base, "--prompt-cache", str(cache), "--prompt-cache-ro", timeout=120)
    assert ro.returncode == 0 and not cache.exists()  # read-only: nothing written
    first = run_cli(*base, "--prompt-cache", str(cache), timeout=120)
    assert first.returncode == 0 and cache.exists(), first.stderr
    assert "prompt cache: 0 of" in first.stderr
    second = run_cli(*base, "--prompt-cache", str(cache), timeout=120)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout == ro.stdout
    reused, total = (int(x) for x in second.stderr.split("prompt cache: ")[1].split()[0:3:2])
    assert reused == total - 1 > 5
    assert not [p for p in tmp_path.iterdir() if ".pyllm-tmp-" in p.name]  # atomic writes
    # a damaged cache: one error line, exit 1
    _damage(cache, "flipped")
    bad = run_cli(*base, "--prompt-cache", str(cache), timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error:")
    assert "corrupt" in bad.stderr and "Traceback" not in bad.stderr
    usage = run_cli(*base, "--prompt-cache-ro", timeout=60)
    assert usage.returncode == 2 and "--prompt-cache FILE" in usage.stderr
