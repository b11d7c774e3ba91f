"""The decode loop's pieces: stop-string matching across token boundaries."""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyllm.errors import ContextError, PyllmWarning, SamplingError
from pyllm.footprint import check_context_fits, context_bytes, kv_cache_bytes
from pyllm.generate import StopMatcher, resolve_max_tokens
from pyllm.model import LLM
from pyllm.sysinfo import available_cpus


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


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.model
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_context_estimate_matches_what_is_allocated(smollm2_path: Path) -> None:
    # The estimate the refusal is based on follows the C++ allocation: an 8k-position context
    # (the cache and scratch are zero-filled, so every page counts in RSS at once).
    # Measured: 1.5 % below the RSS growth; bound 5 % either way.
    base = LLM(smollm2_path, n_ctx=64, n_batch=64, n_threads=2)  # weights mapped and repacked
    r0 = _rss()
    big = LLM(smollm2_path, n_ctx=8192, n_batch=512, n_threads=2)
    grown = _rss() - r0
    estimate = context_bytes(big.hparams, 8192, 512, 2)
    big.close()
    base.close()
    assert abs(grown / estimate - 1) < 0.05, (grown, estimate)
    # the check refuses exactly what does not fit
    hp = big.hparams
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
