"""The decode loop's pieces: stop-string matching across token boundaries."""

from __future__ import annotations

import itertools

import pytest

from pyllm.generate import StopMatcher


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
