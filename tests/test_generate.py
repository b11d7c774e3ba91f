"""The decode loop's pieces: stop-string matching across token boundaries, the step machine
shared by the single-sequence API and the server, and the runtime's import graph."""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import pyllm.runtime
from pyllm.errors import ContextError, PyllmError, PyllmWarning, SamplingError
from pyllm.runtime.footprint import (
    check_context_fits,
    context_bytes,
    kv_cache_bytes,
    logits_bytes,
    scratch_bytes,
)
from pyllm.runtime.generation import StopMatcher, resolve_max_tokens
from pyllm.runtime.llm import LLM
from pyllm.runtime.sampling import SamplingParams
from pyllm.runtime.steps import Released, SequenceSteps
from pyllm.runtime.sysinfo import available_cpus


def feed(stops: list[str], chunks: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = []
    for c in chunks:
        text, stopped = m.push(c)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(m.flush())
    return "".join(out), False


def test_no_stops_passes_everything_through() -> None:
    m = StopMatcher([])
    assert m.push("abc") == ("abc", False)
    assert m.flush() == ""


def test_stop_inside_one_chunk() -> None:
    assert feed(["END"], ["hello END world"]) == ("hello ", True)


def test_stop_split_across_chunks() -> None:
    assert feed(["<|im_end|>"], ["Hi", " there<|im", "_e", "nd|>more"]) == ("Hi there", True)


def test_partial_prefix_is_held_then_released() -> None:
    m = StopMatcher(["User:"])
    assert m.push("ask the Us") == ("ask the ", False)
    assert m.push("er") == ("", False)
    assert m.push("s are") == ("Users are", False)


def test_earliest_of_several_stops_wins() -> None:
    assert feed(["BB", "A"], ["xxBBxA"]) == ("xx", True)
    assert feed(["\n\n", "###"], ["line\n", "\n### next"]) == ("line", True)


def test_held_text_flushed_at_end() -> None:
    assert feed(["STOP"], ["the end ST"]) == ("the end ST", False)


@pytest.mark.parametrize("text", ["abcSTOPdef", "STOP", "xxSTOxSTOP", "S T O P", "SSTOP"])
def test_every_split_gives_the_same_result(text: str) -> None:
    expected = text[: text.find("STOP")] if "STOP" in text else text
    for cut1, cut2 in itertools.combinations(range(len(text) + 1), 2):
        chunks = [text[:cut1], text[cut1:cut2], text[cut2:]]
        got, stopped = feed(["STOP"], chunks)
        assert got == expected, chunks
        assert stopped == ("STOP" in text)


# ---- the step machine (pyllm.runtime.steps.SequenceSteps) on a toy vocabulary -------------------

TOY_VOCAB = ["a", "b", "ST", "OP", "x", "<eos>"]
EOS = 5


class _ToyDecoder:
    def feed(self, token: int) -> str:
        return TOY_VOCAB[token]

    def flush(self) -> str:
        return ""


class _ToyTokenizer:
    def decoder(self, skip_special: bool = True) -> _ToyDecoder:
        return _ToyDecoder()


def _steps(**kw: object) -> SequenceSteps:
    args: dict[str, object] = {"max_tokens": None, "n_ctx": 100, "stop": ["STOP"],
                               "stop_tokens": [EOS]}
    args.update(kw)
    return SequenceSteps(_ToyTokenizer(), len(TOY_VOCAB), [0, 1], SamplingParams(temperature=0),
                         **args)  # type: ignore[arg-type]


def _onehot(token: int) -> np.ndarray:
    row = np.zeros(len(TOY_VOCAB), dtype=np.float32)
    row[token] = 8.0
    return row


def _drive(steps: SequenceSteps, tokens: list[int]) -> list[Released]:
    out: list[Released] = []
    for t in tokens:
        out += steps.advance(_onehot(t))
        if steps.done:
            break
    return out


def test_steps_stop_string_across_tokens_is_dropped() -> None:
    steps = _steps()
    out = _drive(steps, [0, 2, 3, 4])
    # "ST" is held back as a possible stop prefix, "OP" completes it: neither is released
    assert [(r.text, r.token) for r in out] == [("a", 0), ("", 2), ("", 3)]
    assert steps.finish_reason == "stop" and steps.stopped_by_string
    assert steps.tokens == [0, 2, 3]


def test_steps_stop_token_releases_the_held_text() -> None:
    steps = _steps()
    out = _drive(steps, [0, 2, EOS])
    assert [(r.text, r.token) for r in out] == [("a", 0), ("", 2), ("ST", None)]
    assert steps.finish_reason == "stop" and not steps.stopped_by_string
    assert steps.tokens == [0, 2]  # the end token is not part of the output


def test_steps_token_limit_and_context_limit() -> None:
    steps = _steps(max_tokens=2)
    out = _drive(steps, [0, 2, 4])
    assert [(r.text, r.token) for r in out] == [("a", 0), ("", 2), ("ST", None)]
    assert steps.finish_reason == "length" and steps.tokens == [0, 2]
    # the prompt (2 tokens) + 3 generated fill n_ctx=5: the third token is the last
    steps = _steps(n_ctx=5)
    out = _drive(steps, [1, 1, 1, 1])
    assert "".join(r.text for r in out) == "bbb"
    assert steps.finish_reason == "length" and len(steps.tokens) == 3


def test_steps_zero_tokens_is_done_before_any_step() -> None:
    steps = _steps(max_tokens=0)
    assert steps.done and steps.finish_reason == "length"
    with pytest.raises(PyllmError, match="already finished"):
        steps.advance(_onehot(0))


def test_steps_logprobs_are_the_log_softmax_of_the_row() -> None:
    steps = _steps(logprobs=2)
    row = np.array([1.0, 3.0, 0.5, -1.0, 2.0, -2.0], dtype=np.float32)
    (out,) = steps.advance(row)
    assert out.token == 1 and out.logprob is not None and out.logprob.token == 1
    x = row.astype(np.float64)
    lp = x - (np.log(np.exp(x - x.max()).sum()) + x.max())
    assert out.logprob.logprob == pytest.approx(lp[1], abs=1e-6)
    assert [t for t, _ in out.logprob.top_logprobs] == [1, 4]
    assert [v for _, v in out.logprob.top_logprobs] == pytest.approx([lp[1], lp[4]], abs=1e-6)


# ---- the runtime's import graph ----------------------------------------------------------------

# the runtime package that is imported (a source tree's, or an installed wheel's)
RUNTIME = Path(pyllm.runtime.__file__).resolve().parent
RUNTIME_MODULES = tuple(sorted(p.stem for p in RUNTIME.glob("*.py") if p.stem != "__init__"))


def _imports(name: str) -> set[str]:
    """The pyllm modules a runtime module imports when run (anywhere in it, functions included,
    but not under ``if TYPE_CHECKING:``, which only the type checker follows)."""
    src = (RUNTIME / f"{name}.py").read_text()
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom) and node.module:
            found.update(f"{node.module}.{a.name}" for a in node.names)
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(src))
    return {m for m in found if m.startswith("pyllm.")}


def _runtime_imports(name: str) -> set[str]:
    return {m.removeprefix("pyllm.runtime.") for m in _imports(name)} & set(RUNTIME_MODULES)


def test_no_import_cycle_in_the_runtime() -> None:
    assert {"llm", "generation", "completions", "steps", "loaded"} <= set(RUNTIME_MODULES)
    graph = {m: _runtime_imports(m) for m in RUNTIME_MODULES}
    assert graph["steps"] <= {"sampling"}  # the shared step machine sits below the loops
    assert "generation" in graph["completions"]  # the walk does see imports (negative control)

    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen

    cycles = [m for m in RUNTIME_MODULES if m in reach(m)]
    assert cycles == [], graph


def test_the_runtime_imports_no_tool_cli_or_server() -> None:
    """The folders say what depends on what: the runtime needs formats, tokenizer and chat,
    never the offline tools, the CLI or the server."""
    outside = {
        name: sorted(m for m in _imports(name)
                     if m.startswith(("pyllm.tools", "pyllm.cli", "pyllm.server")))
        for name in RUNTIME_MODULES
    }
    assert {k: v for k, v in outside.items() if v} == {}
    assert any(m.startswith("pyllm.formats") for m in _imports("loaded"))  # it does see them


# ---- token limits, context and thread checks on the real model --------------------------------

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def llm(smollm2_path: Path) -> Iterator[LLM]:
    with LLM(smollm2_path, n_ctx=48, n_threads=1) as model:
        yield model


@pytest.mark.model
def test_max_tokens_zero_generates_nothing(llm: LLM) -> None:
    # llama.cpp's meaning everywhere: 0 = no token (it used to run until the context was full)
    assert llm.generate("Once upon a time", max_tokens=0, **GREEDY) == ""
    out = llm.create_completion("Once upon a time", max_tokens=0, **GREEDY)
    assert out["choices"][0]["text"] == "" and out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 0
    msgs = [{"role": "user", "content": "Hi"}]
    assert llm.chat(msgs, max_tokens=0, **GREEDY) == ""
    chunks = list(llm.create_chat_completion(msgs, max_tokens=0, stream=True, **GREEDY))
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 0


@pytest.mark.model
@pytest.mark.parametrize("limit", [-1, None])
def test_max_tokens_minus_one_runs_until_done(llm: LLM, limit: int | None) -> None:
    out = llm.create_completion("Once upon a time", max_tokens=limit, **GREEDY)
    usage = out["usage"]
    # no end token within 48 positions for this prompt: it stops at the full context
    assert out["choices"][0]["finish_reason"] == "length"
    assert usage["total_tokens"] == llm.n_ctx and usage["completion_tokens"] > 16


@pytest.mark.model
@pytest.mark.parametrize("limit", [-2, -100, 1.5, True])
def test_bad_max_tokens(llm: LLM, limit: object) -> None:
    with pytest.raises(SamplingError, match="max_tokens must be -1"):
        llm.generate("hi", max_tokens=limit)  # type: ignore[arg-type]
    with pytest.raises(SamplingError, match="max_tokens must be -1"):
        llm.create_completion("hi", max_tokens=limit)  # type: ignore[arg-type]


def test_resolve_max_tokens_is_the_one_reading() -> None:
    assert [resolve_max_tokens(v) for v in (None, -1, 0, 1, 500)] == [None, None, 0, 1, 500]


@pytest.mark.model
@pytest.mark.parametrize("n_ctx", [10**7, 2**31 - 1])
def test_context_too_big_for_memory_is_refused(smollm2_path: Path, n_ctx: int) -> None:
    with pytest.raises(ContextError, match=r"needs [\d.]+ GiB .* but only [\d.]+ \w+ of memory"):
        LLM(smollm2_path, n_ctx=n_ctx)


@pytest.mark.model
@pytest.mark.parametrize("kw", [{"n_ctx": 2**31}, {"n_batch": 2**31}, {"n_ctx": 0},
                                {"n_threads": 0}, {"n_ctx": True}])
def test_bad_counts_are_context_errors(smollm2_path: Path, kw: dict[str, int]) -> None:
    with pytest.raises(ContextError):
        LLM(smollm2_path, **kw)


@pytest.mark.model
def test_threads_capped_at_available_cpus(smollm2_path: Path) -> None:
    cpus = available_cpus()
    with pytest.warns(PyllmWarning, match=f"1000 threads asked for .* using {cpus}"), \
            LLM(smollm2_path, n_ctx=32, n_threads=1000) as model:
        assert model.n_threads == cpus
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the limit: no warning
        with LLM(smollm2_path, n_ctx=32, n_threads=cpus) as model:
            assert model.n_threads == cpus


@pytest.mark.model
def test_context_beyond_training_warns(smollm2_path: Path) -> None:
    with pytest.warns(PyllmWarning, match="n_ctx 8200 exceeds the 8192 positions .* 1x"), \
            LLM(smollm2_path, n_ctx=8200, n_batch=16):
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LLM(smollm2_path, n_ctx=8192, n_batch=16).close()


# Run in a fresh process: in a long test session glibc's heap (its mmap threshold grows after
# large frees) may hand the new context pages that are already resident, hiding the growth.
_MEASURE = """
import sys
from pyllm import _core
from pyllm.runtime.llm import LLM

def statm():  # (address space, resident) in bytes
    with open("/proc/self/statm") as f:
        size, resident = f.read().split()[:2]
    return int(size) * 4096, int(resident) * 4096

llm = LLM(sys.argv[1], n_ctx=64, n_batch=64, n_threads=2)  # weights mapped and repacked
v0, r0 = statm()
ctx = _core.Context(llm._model, n_ctx=8192, n_batch=512, n_threads=2,
                    kv_type=_core.KVType.f16)
v1, r1 = statm()
print(v1 - v0, r1 - r0)
"""


@pytest.mark.model
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_context_estimate_matches_what_is_allocated(smollm2_path: Path, tmp_path: Path) -> None:
    # The estimate the refusal is based on follows the C++ allocation: an 8k-position context
    # grows the address space by the cache + scratch estimate (measured: within 1 %; bound 5 %
    # either way); the logits of a chunk come on top while a call returns them. The cache is
    # zero pages until written (calloc), so resident memory grows by much less at creation
    # (the scratch, about a tenth; bound: under a third), and by the positions used later.
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(smollm2_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    grown, resident = map(int, proc.stdout.split())
    with LLM(smollm2_path, n_ctx=64) as llm:
        hp = llm.hparams
    kept = kv_cache_bytes(hp, 8192) + scratch_bytes(hp, 8192, 512, 2)
    assert abs(grown / kept - 1) < 0.05, (grown, kept)
    assert resident < kept / 3, (resident, kept)
    estimate = context_bytes(hp, 8192, 512, 2)
    assert estimate == kept + logits_bytes(hp, 512)
    # the check refuses exactly what does not fit
    need = check_context_fits(hp, 8192, 512, 2, available=estimate)
    assert need == estimate
    with pytest.raises(ContextError, match="q8_0"):
        check_context_fits(hp, 8192, 512, 2, available=estimate - 1)
    assert kv_cache_bytes(hp, 8192, "q8_0") * 32 == kv_cache_bytes(hp, 8192, "f16") * 17


@pytest.mark.model
def test_prompt_too_long_in_bytes_is_refused_before_tokenizing(llm: LLM) -> None:
    # ten million letters would take the tokenizer seconds and GBs; n_ctx=48 tokens of at most
    # max_token_bytes each cannot hold them, which is known from the length alone
    with pytest.raises(ContextError, match="input too long for the context: 10000000 bytes"):
        llm.generate("a" * 10**7, max_tokens=1)
