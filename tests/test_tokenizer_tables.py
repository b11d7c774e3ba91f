"""The BPE merge tables the extension builds (``_core.bpe_pair_table``) against the tokenizer's
own Python path: the same pair table, byte ids, extra symbols and stride on real vocabularies
and on hand-made ones with the cases the interning rules exist for; the Python path (and its
error) wherever the extension declines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyllm.errors import TokenizerError
from pyllm.tokenizer import Tokenizer, bpe
from pyllm.tokenizer.bpe import BYTE_TO_CHAR, BpeModel, bytes_to_token_text
from pyllm.tokenizer.vocab import vocab_from_metadata

core = pytest.importorskip("pyllm._core")


def tables(model: BpeModel) -> tuple[dict[int, int], list[int], dict[int, str], int]:
    return dict(model._pairs), model._byte_id, model._extra, model._stride


def python_model(md: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> BpeModel:
    with monkeypatch.context() as m:
        m.setattr(bpe, "_fast_pair_table", lambda: None)
        return BpeModel(vocab_from_metadata(md))


def tiny_bpe(merges: list[str], extra_tokens: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    # the alphabet minus "z" (so one byte character is interned past the vocabulary)
    alphabet = [bytes_to_token_text(bytes([b])) for b in range(256) if b != ord("z")]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": alphabet + ["ab", "Ġa", *extra_tokens],
        "tokenizer.ggml.merges": merges,
    }


@pytest.mark.parametrize("name", ["llama-bpe", "gpt-2"])
def test_extension_tables_equal_python_ones(
    name: str, vocab_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyllm.formats.gguf import GGUFReader

    md = dict(GGUFReader(vocab_dir / f"ggml-vocab-{name}.gguf").metadata)
    fast = BpeModel(vocab_from_metadata(md))
    slow = python_model(md, monkeypatch)
    assert len(fast._pairs) > 40_000
    assert tables(fast) == tables(slow)


def test_smollm2_tables_equal_python_ones(
    smollm2_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyllm.formats.gguf import GGUFReader

    md = dict(GGUFReader(smollm2_path).metadata)
    assert tables(BpeModel(vocab_from_metadata(md))) == tables(python_model(md, monkeypatch))


def test_interning_duplicates_and_missing_results(monkeypatch: pytest.MonkeyPatch) -> None:
    # "a b" twice (the first rank wins), results that are no token ("bc", "abbc"), a part that
    # is no token ("z"), non-ASCII parts, a left part that is a space
    merges = ["a b", "b c", "a b", "ab bc", "z a", "é ab", "  a", "Ġ a"]
    md = tiny_bpe(merges)
    fast, slow = BpeModel(vocab_from_metadata(md)), python_model(md, monkeypatch)
    assert tables(fast) == tables(slow)
    pairs, byte_id, extra, stride = tables(fast)
    n = len(md["tokenizer.ggml.tokens"])
    assert extra == {n: "z", n + 1: " ", n + 2: "bc", n + 3: "abbc", n + 4: "za", n + 5: "éab",
                     n + 6: " a"}
    assert stride == n + len(extra) + 1
    a, b = byte_id[ord("a")], byte_id[ord("b")]
    assert pairs[a * stride + b] == 0 * stride + n - 2  # rank 0 -> "ab", not the duplicate's 2
    # the tokenizer built on them encodes the same either way (negative control: a plain "ab")
    text = "abc zab ab"
    assert (Tokenizer(vocab_from_metadata(md)).encode(text, add_special=False)
            == _python_tokenizer(md, monkeypatch).encode(text, add_special=False))


def _python_tokenizer(md: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Tokenizer:
    with monkeypatch.context() as m:
        m.setattr(bpe, "_fast_pair_table", lambda: None)
        return Tokenizer(vocab_from_metadata(md))


@pytest.mark.parametrize(
    "merges", [["ab"], ["a "], [" a"], ["a b", "x"]],
    ids=["no space", "empty right", "space first only", "one bad of two"])
def test_malformed_merges_raise_the_python_error(merges: list[str]) -> None:
    md = tiny_bpe(merges)
    fill: dict[int, int] = {}
    assert core.bpe_pair_table(md["tokenizer.ggml.tokens"], merges, BYTE_TO_CHAR, fill) is None
    assert fill == {}  # declined before anything was written
    with pytest.raises(TokenizerError, match="is not 'left right'"):
        Tokenizer.from_metadata(md)


def test_surrogate_escaped_tokens_take_the_python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # bytes of a file that are not UTF-8 come through the reader as lone surrogates
    odd = b"\xff\xfe".decode("utf-8", errors="surrogateescape")
    md = tiny_bpe(["a b"], extra_tokens=[odd])
    assert core.bpe_pair_table(md["tokenizer.ggml.tokens"], ["a b"], BYTE_TO_CHAR, {}) is None
    assert tables(BpeModel(vocab_from_metadata(md))) == tables(python_model(md, monkeypatch))


def test_the_fast_path_is_the_one_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = core.bpe_pair_table

    def counting(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(bpe, "_fast_pair_table", lambda: counting)
    BpeModel(vocab_from_metadata(tiny_bpe(["a b"])))
    assert calls == [1]
