"""The README's Python examples run as written, from any folder (not only the repo root)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from collections.abc import Mapping
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


# `name` VALUE pairs of the README's sampling sentence: a number, or {} for an empty mapping
_STATED = re.compile(r"`(\w+)` (\{\}|-?\d+(?:\.\d+)?)(?![\w`])")


def _sampling_sentence() -> str:
    """The README bullet that lists the sampling keywords and their defaults."""
    text = README.read_text(encoding="utf-8")
    start = text.index("\n- Sampling keywords")
    end = text.index("\n- ", start + 1)
    return " ".join(text[start:end].split())


def _sampling_sentence_errors(sentence: str) -> list[str]:
    """How a sampling sentence disagrees with pyllm.runtime.sampling's defaults: a default it
    leaves out, states wrongly (an int field must be written as an int) or twice, or a name
    that is not a sampling field."""
    from pyllm.runtime.sampling import DEFAULTS

    stated: dict[str, str] = {}
    errors = []
    for name, value in _STATED.findall(sentence):
        if name in stated:
            errors.append(f"{name} stated twice")
        stated[name] = value
    for name, value in stated.items():
        if name not in DEFAULTS:
            errors.append(f"{name} is not a sampling field")
            continue
        default = DEFAULTS[name]
        if isinstance(default, Mapping):
            ok = value == "{}" and not default
        elif isinstance(default, int):
            ok = value.lstrip("-").isdigit() and int(value) == default
        else:
            ok = value != "{}" and float(value) == default
        if not ok:
            errors.append(f"{name} is stated as {value}, its default is {default!r}")
    errors += [f"{name} (default {DEFAULTS[name]!r}) is not stated"
               for name in DEFAULTS if name not in stated]
    return errors


def test_readme_sampling_defaults_are_the_real_ones() -> None:
    sentence = _sampling_sentence()
    assert _sampling_sentence_errors(sentence) == []
    # the check sees a wrong, a missing and an unknown default (negative controls)
    assert _sampling_sentence_errors(sentence.replace("`temperature` 0.8", "`temperature` 0.7")
                                     ) == ["temperature is stated as 0.7, its default is 0.8"]
    assert _sampling_sentence_errors(sentence.replace("`top_k` 40", "`top_k` 40.0")
                                     ) == ["top_k is stated as 40.0, its default is 40"]
    assert _sampling_sentence_errors(sentence.replace("`seed` -1", "`seed`")
                                     ) == ["seed (default -1) is not stated"]
    assert _sampling_sentence_errors(sentence + " `top_q` 0.5") == [
        "top_q is not a sampling field"]


def test_structured_output_example(smollm2_path: Path, tmp_path: Path) -> None:
    from ast import literal_eval

    (block, _server) = _python_blocks("## Structured output and tool calls")
    proc = _run(block, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4, proc.stdout
    city = literal_eval(lines[0])  # the printed dict (repr of json.loads' result)
    assert isinstance(city["city"], str) and isinstance(city["population"], int)
    assert re.fullmatch(r"[0-9]+(\.[0-9]+)?", lines[1])
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", lines[2])
    name, args = lines[3].split(" ", 1)
    assert name == "get_weather" and isinstance(literal_eval(args)["city"], str)


def test_structured_output_server_example(smollm2_path: Path, tmp_path: Path) -> None:
    """The server example, as written but for the port: against a server on a free one."""
    import json

    from pyllm.runtime.llm import LLM
    from pyllm.server.app import ServerConfig, create_app
    from pyllm.server.engine import Engine
    from tests.conftest import serve

    (_, block) = _python_blocks("## Structured output and tool calls")
    assert "http://127.0.0.1:8080/v1" in block
    with LLM(smollm2_path, n_ctx=1024) as llm:
        engine = Engine(llm, n_parallel=2, n_ctx=512)
        try:
            with serve(create_app(ServerConfig(model_id="pyllm"), engine=engine)) as url:
                proc = _run(block.replace("http://127.0.0.1:8080", url), tmp_path)
        finally:
            engine.stop()
    assert proc.returncode == 0, proc.stderr
    args_line, colour_line = proc.stdout.splitlines()
    args = json.loads(args_line)
    assert isinstance(args["a"], int) and isinstance(args["b"], int)
    assert json.loads(colour_line)["colour"] in ("red", "green", "blue")


def test_speculative_example(smollm2_path: Path, tmp_path: Path) -> None:
    """The README's speculative decoding example runs and prints what plain decoding gives."""
    (block,) = _python_blocks("### Speculative decoding")
    proc = _run(block, tmp_path)
    assert proc.returncode == 0, proc.stderr
    from pyllm.runtime.llm import LLM

    text = "The quick brown fox jumps over the lazy dog. The dog sleeps all day in the sun."
    with LLM(n_ctx=1024) as llm:
        reply = llm.chat([{"role": "user", "content": f"Repeat word for word:\n\n{text}"}],
                         max_tokens=64, temperature=0)
        more = llm.generate(text + "\n" + text[:20], max_tokens=24, temperature=0)
    assert proc.stdout == f"{reply}\n{more}\n"
