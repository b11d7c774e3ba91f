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
    return dict(model._pairs.items()), model._byte_id, model._extra, model._stride


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
    assert core.bpe_pair_table(md["tokenizer.ggml.tokens"], merges, BYTE_TO_CHAR) is None
    with pytest.raises(TokenizerError, match="is not 'left right'"):
        Tokenizer.from_metadata(md)


def test_surrogate_escaped_tokens_take_the_python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # bytes of a file that are not UTF-8 come through the reader as lone surrogates
    odd = b"\xff\xfe".decode("utf-8", errors="surrogateescape")
    md = tiny_bpe(["a b"], extra_tokens=[odd])
    assert core.bpe_pair_table(md["tokenizer.ggml.tokens"], ["a b"], BYTE_TO_CHAR) is None
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


def _gguf_md(path: Path) -> dict[str, Any]:
    from pyllm.formats.gguf import GGUFReader

    return GGUFReader(path).fields  # type: ignore[return-value]


def test_merges_are_read_from_the_file(smollm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A GGUF file's tokens and merges reach the extension as the file's bytes (no str made):
    # the same tables as from lists of their texts, and as the Python path's.
    from pyllm.formats.gguf import StringArray

    fields = _gguf_md(smollm2_path)
    tokens, texts = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.merges"]
    assert isinstance(tokens, StringArray) and isinstance(texts, StringArray)
    vocab = vocab_from_metadata(fields)
    assert vocab.tokens is tokens and vocab.merge_texts is texts
    from_file = core.bpe_pair_table(tokens.location, texts.location, BYTE_TO_CHAR)
    from_list = core.bpe_pair_table(tokens.tolist(), texts.tolist(), BYTE_TO_CHAR)
    assert from_file is not None and from_list is not None
    assert dict(from_file[0].items()) == dict(from_list[0].items())
    assert from_file[1:] == from_list[1:]
    assert tables(BpeModel(vocab)) == tables(python_model(fields, monkeypatch))


def test_merges_not_utf8_take_the_python_path(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Two halves that are not UTF-8 alone but are joined ("\xc3" + "\xa9" = "é"): Python joins
    # their surrogate escapes, not the bytes, so the extension must leave such a file to it.
    from pyllm.formats.gguf import GGUFWriter, ValueType

    md = tiny_bpe(["a b"])
    esc = b"\xc3 \xa9".decode("utf-8", errors="surrogateescape")
    path = tmp_path / "v.gguf"
    w = GGUFWriter(path)
    w.add_kv("tokenizer.ggml.model", "gpt2", ValueType.STRING)
    w.add_kv("tokenizer.ggml.pre", "gpt-2", ValueType.STRING)
    w.add_kv("tokenizer.ggml.tokens", md["tokenizer.ggml.tokens"], ValueType.ARRAY,
             ValueType.STRING)
    w.add_kv("tokenizer.ggml.merges", ["a b", esc], ValueType.ARRAY, ValueType.STRING)
    w.write()
    fields = _gguf_md(path)
    loc = fields["tokenizer.ggml.merges"].location
    assert core.bpe_pair_table(md["tokenizer.ggml.tokens"], loc, BYTE_TO_CHAR) is None
    # control: the valid first merge alone is taken
    assert core.bpe_pair_table(md["tokenizer.ggml.tokens"], (loc[0], loc[1], 1),
                               BYTE_TO_CHAR) is not None
    fast = BpeModel(vocab_from_metadata(fields))
    assert isinstance(fast._pairs, bpe.PairTable)  # the Python path built it
    assert tables(fast) == tables(python_model(fields, monkeypatch))


@pytest.mark.parametrize("name", ["llama-bpe", "gpt-2"])
def test_short_merge_equals_python(name: str, vocab_dir: Path) -> None:
    # The extension's merge of a short pre-token against bpe.py's list scan over the same
    # table: the same symbols and the same work counted, on random words of the vocabulary's
    # own pieces and of random bytes.
    import random

    fields = _gguf_md(vocab_dir / f"ggml-vocab-{name}.gguf")
    model = BpeModel(vocab_from_metadata(fields))
    pairs = model._pairs
    assert not isinstance(pairs, dict)
    rng = random.Random(3)
    pieces = [t for t in model._vocab.tokens[:5000] if t.isascii()]
    words = ["".join(rng.choices(pieces, k=rng.randint(1, 6))).replace("Ġ", " ")
             for _ in range(300)]
    words += [bytes(rng.randrange(256) for _ in range(rng.randint(1, 48))).decode(
        "utf-8", errors="replace") for _ in range(300)]
    for word in words:
        raw = word.encode("utf-8")
        ours, theirs = [0], [0]
        got = pairs.merge_short(raw, ours)
        sym = [model._byte_id[b] for b in raw]
        model.merge_steps, saved = theirs, model.merge_steps
        if len(sym) > 1:
            model._merge_short(sym)
        model.merge_steps = saved
        assert list(got) == sym and ours == theirs, word
    assert sum(len(pairs.merge_short(w.encode(), [0])) < len(w.encode()) for w in words) > 250


def test_pair_table_lookups(smollm2_path: Path) -> None:
    model = BpeModel(vocab_from_metadata(_gguf_md(smollm2_path)))
    pairs, stride = model._pairs, model._stride
    items = pairs.items()
    assert len(items) == len(pairs) > 40_000
    key, value = items[0]
    assert pairs[key] == pairs.get(key) == value and value % stride < stride
    missing = stride * stride - 1  # ids below the stride: no real pair has this key
    assert pairs[missing] == -1 and pairs.get(missing) is None and pairs.get(missing, 7) == 7
    assert pairs[-5] == -1


def test_a_gguf_tokenizer_holds_no_merge_strings(smollm2_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # What a model's process keeps of its tokenizer (Python allocations, tracemalloc; the
    # extension's table, ~2 MB, is not among them): SmolLM2's 49k token strings and a few
    # lists, ~4.8 MB. Negative control: the Python path also holds the merges as strings and
    # the pair dict, ~22 MB.
    import gc
    import tracemalloc

    from pyllm.tokenizer import Tokenizer

    def retained() -> float:
        Tokenizer.from_gguf(smollm2_path)  # imports and caches warmed
        tracemalloc.start()
        try:
            tok = Tokenizer.from_gguf(smollm2_path)
            assert tok.encode("Hello world", add_special=False) == [19556, 905]
            gc.collect()
            return tracemalloc.get_traced_memory()[0] / 2**20
        finally:
            tracemalloc.stop()

    assert retained() < 6.0
    monkeypatch.setattr(bpe, "_fast_pair_table", lambda: None)
    assert retained() > 15.0


def _write_vocab(path: Path, md: dict[str, Any]) -> Path:
    from pyllm.formats.gguf import GGUFWriter, ValueType

    w = GGUFWriter(path)
    for key, value in md.items():
        if isinstance(value, list):
            w.add_kv(key, value, ValueType.ARRAY, ValueType.STRING)
        else:
            w.add_kv(key, value, ValueType.STRING)
    w.write()
    return path


@pytest.mark.parametrize("name", ["smollm2", "llama-bpe", "gpt-2"])
def test_vocab_from_the_file_equals_the_vocab_from_lists(name: str, smollm2_path: Path,
                                                         vocab_dir: Path) -> None:
    # Tokens checked and looked up in the file (no str made) give the vocabulary that lists
    # of the same texts give: every field.
    import dataclasses

    from pyllm.formats.gguf import GGUFReader, StringArray

    path = smollm2_path if name == "smollm2" else vocab_dir / f"ggml-vocab-{name}.gguf"
    fields = GGUFReader(path).fields
    lists = {k: v.tolist() if isinstance(v, StringArray) else v for k, v in fields.items()}
    from_file, from_lists = vocab_from_metadata(fields), vocab_from_metadata(lists)
    assert isinstance(from_file.tokens, StringArray) and type(from_lists.tokens) is list
    for f in dataclasses.fields(from_file):
        assert getattr(from_file, f.name) == getattr(from_lists, f.name), f.name
    assert from_file.token_to_id == from_lists.token_to_id
    assert from_file.eog_ids and from_file.special_tokens  # names were found in the file


@pytest.mark.parametrize("extension", [True, False])
def test_a_token_twice_in_the_file_is_named(tmp_path: Path, extension: bool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from pyllm.formats.gguf import GGUFReader
    from pyllm.formats.gguf import strings as strings_module

    md = tiny_bpe(["a b"], extra_tokens=["xy", "Ġa"])
    n = len(md["tokenizer.ggml.tokens"])
    fields = GGUFReader(_write_vocab(tmp_path / "v.gguf", md)).fields
    if not extension:
        monkeypatch.setattr(strings_module, "optional_core", lambda name: None)
    message = rf"token 'Ġa' appears twice in tokenizer.ggml.tokens \(ids {n - 3} and {n - 1}\)"
    with pytest.raises(TokenizerError, match=message):
        vocab_from_metadata(fields)
    with pytest.raises(TokenizerError, match=message):  # the list path words it the same
        vocab_from_metadata(md)


def test_an_empty_token_in_the_file_is_renamed(tmp_path: Path) -> None:
    from pyllm.formats.gguf import GGUFReader

    md = tiny_bpe(["a b"], extra_tokens=[""])
    n = len(md["tokenizer.ggml.tokens"])
    vocab = vocab_from_metadata(GGUFReader(_write_vocab(tmp_path / "v.gguf", md)).fields)
    assert type(vocab.tokens) is list and vocab.tokens[n - 1] == f"[EMPTY_{n - 1}]"
    assert Tokenizer(vocab).encode("ab", add_special=False) == [vocab.token_to_id["ab"]]
