"""GGUF string arrays as the reader gives them (``StringArray``): read from the file on use,
equal to the list the file holds through every way of reading them, with and without the
extension's readers; ``metadata`` and ``get`` give plain lists; nested arrays stay lists."""

from __future__ import annotations

import copy
import operator
import pickle
from pathlib import Path

import pytest

from pyllm.errors import GGUFError
from pyllm.formats.gguf import GGUFReader, GGUFWriter, StringArray, ValueType
from pyllm.formats.gguf import reader as reader_module
from pyllm.formats.gguf import strings as strings_module

# a lone surrogate: bytes of a file that are not UTF-8 (the writer stores b"\xff")
ODD = b"\xff".decode("utf-8", errors="surrogateescape")
WORDS = ["a", "", "é ab", "\u4e2d\u6587", "\U0001f600", ODD, "x" * 300, "\n"]


def write(path: Path) -> Path:
    w = GGUFWriter(path)
    w.add_kv("words", WORDS, ValueType.ARRAY, ValueType.STRING)
    w.add_kv("empty", [], ValueType.ARRAY, ValueType.STRING)
    w.add_kv("nested", [["a", "b"], ["c"]], ValueType.ARRAY, ValueType.ARRAY)
    w.add_kv("after", 7, ValueType.UINT32)  # parsing went on past the walked arrays
    w.write()
    return path


@pytest.fixture(params=["extension", "python"])
def reader(request: pytest.FixtureRequest, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> GGUFReader:
    if request.param == "python":  # the loops that run without the compiled readers
        monkeypatch.setattr(reader_module, "optional_core", lambda name: None)
        monkeypatch.setattr(strings_module, "optional_core", lambda name: None)
    else:
        pytest.importorskip("pyllm._core")
    return GGUFReader(write(tmp_path / "s.gguf"))


def test_reads_as_the_list_it_holds(reader: GGUFReader) -> None:
    arr = reader.fields["words"]
    assert isinstance(arr, StringArray) and len(arr) == len(WORDS)
    assert arr.tolist() == list(arr) == WORDS
    # a list on the left compares through StringArray's own __eq__
    assert arr == WORDS and operator.eq(WORDS, arr) and arr == tuple(WORDS) and arr != WORDS[:-1]
    assert arr != ["b", *WORDS[1:]] and (arr == 5) is False
    assert [arr[i] for i in range(len(WORDS))] == WORDS
    assert arr[-1] == WORDS[-1] and arr[-len(WORDS)] == WORDS[0]
    assert arr[2:5] == WORDS[2:5] and arr[::-3] == WORDS[::-3]
    assert ODD in arr and arr.index("é ab") == 2 and list(reversed(arr)) == WORDS[::-1]
    for bad in (len(WORDS), -len(WORDS) - 1):
        with pytest.raises(IndexError):
            arr[bad]
    assert reader.fields["empty"] == [] and len(reader.fields["empty"]) == 0
    assert reader.fields["after"] == 7
    assert repr(arr) == "StringArray(['a', '', 'é ab'], ... 5 more)"
    with pytest.raises(TypeError):
        hash(arr)


def test_metadata_and_get_give_lists(reader: GGUFReader) -> None:
    assert type(reader.get("words")) is list and reader.get("words") == WORDS
    assert type(reader.metadata["words"]) is list and reader.metadata["words"] == WORDS
    # arrays inside arrays are decoded lists, as before
    assert reader.fields["nested"] == [["a", "b"], ["c"]]
    assert all(type(x) is list for x in reader.fields["nested"])


def test_copies_are_lists(reader: GGUFReader) -> None:
    arr = reader.fields["words"]
    for copied in (pickle.loads(pickle.dumps(arr)), copy.deepcopy(arr)):
        assert type(copied) is list and copied == WORDS


def test_location_is_where_the_strings_are(reader: GGUFReader) -> None:
    buf, pos, count = reader.fields["words"].location
    assert count == len(WORDS)
    # the first string's u64 length, then its bytes
    assert int.from_bytes(buf[pos : pos + 8], "little") == 1
    assert bytes(buf[pos + 8 : pos + 9]) == b"a"


def test_round_trips_through_the_writer(reader: GGUFReader, tmp_path: Path) -> None:
    copy_path = tmp_path / "copy.gguf"
    w = GGUFWriter(copy_path)
    w.add_metadata(reader.metadata, reader.value_types)
    w.write()
    assert copy_path.read_bytes() == Path(reader.path).read_bytes()


def test_a_truncated_array_fails_at_parse(tmp_path: Path) -> None:
    data = write(tmp_path / "s.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: data.index(b"x" * 300) + 10])  # inside the long string
    with pytest.raises(GGUFError, match=r"element 6 of 'words' \(declared length 300\) runs "
                                        r"past the end of the file"):
        GGUFReader(cut)


def test_find_and_first_duplicate(reader: GGUFReader, tmp_path: Path) -> None:
    arr = reader.fields["words"]
    assert [arr.find(w) for w in WORDS] == list(range(len(WORDS)))
    assert arr.find("b") == -1 and arr.find("é a") == -1 and arr.find("\ud800") == -1
    assert arr.first_duplicate() is None
    w = GGUFWriter(tmp_path / "d.gguf")
    w.add_kv("d", ["x", "y", ODD, "y", ODD], ValueType.ARRAY, ValueType.STRING)
    w.write()
    dup = GGUFReader(tmp_path / "d.gguf").fields["d"]
    assert dup.first_duplicate() == (1, 3) and dup.find("y") == 1 and dup.find(ODD) == 2
