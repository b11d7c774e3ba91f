"""GGUF reader/writer: round trips (ours and the gguf package's) and the malformed-file corpus."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from pyllm.errors import GGUFError
from pyllm.formats.gguf import GGMLType, GGUFReader, GGUFWriter, ValueType
from tests.gguf_craft import Crafted, TInfo, f32_tensor_file, gstr, kv_raw, kv_str, kv_u32


def _sample_writer(path: Path, alignment: int = 32) -> GGUFWriter:
    """A small file exercising every metadata value type, nested arrays and several tensors."""
    rng = np.random.default_rng(0)
    w = GGUFWriter(path, alignment=alignment)
    w.add_kv("general.architecture", "llama")
    w.add_kv("u8", 7, ValueType.UINT8)
    w.add_kv("i8", -7, ValueType.INT8)
    w.add_kv("u16", 65000, ValueType.UINT16)
    w.add_kv("i16", -32000, ValueType.INT16)
    w.add_kv("u32", 4_000_000_000)
    w.add_kv("i32", -2_000_000_000)
    w.add_kv("f32", 1e-5)
    w.add_kv("bool", True)
    w.add_kv("str", "héllo wörld ✓")
    w.add_kv("u64", 1 << 40)
    w.add_kv("i64", -(1 << 40))
    w.add_kv("f64", 3.141592653589793, ValueType.FLOAT64)
    w.add_kv("arr.str", ["a", "", "<0x0A>", "▁the"])
    w.add_kv("arr.f32", np.array([0.5, -1.25, 3.0], dtype=np.float32))
    w.add_kv("arr.i32", [1, -2, 3])
    w.add_kv("arr.bool", np.array([True, False, True]))
    w.add_kv("arr.nested", [[1, 2], [3]], ValueType.ARRAY, ValueType.ARRAY)
    w.add_kv("arr.empty", [], ValueType.ARRAY, ValueType.INT32)
    w.add_tensor("f32.matrix", rng.standard_normal((3, 8)).astype(np.float32))
    w.add_tensor("f16.vec", rng.standard_normal(64).astype(np.float16))
    q40 = rng.integers(0, 255, size=(2, 2 * 18), dtype=np.uint8)  # 2 rows x 64 elements
    q40[:, 1] = 0x3C  # sane f16 scales (0x3Cxx ~ 1.0) in each block: byte 1 of each 18
    q40[:, 19] = 0x3C
    w.add_tensor("q4_0.matrix", q40, GGMLType.Q4_0, dims=(64, 2))
    w.add_tensor("lazy.f32", lambda: np.ones((4, 32), np.float32), GGMLType.F32, dims=(32, 4))
    return w


@pytest.fixture()
def sample_file(tmp_path: Path) -> Path:
    path = tmp_path / "sample.gguf"
    _sample_writer(path).write()
    return path


def test_roundtrip_own_reader(sample_file: Path) -> None:
    r = GGUFReader(sample_file)
    md = r.metadata
    assert r.version == 3
    assert md["u8"] == 7 and md["i8"] == -7 and md["u16"] == 65000 and md["i16"] == -32000
    assert md["u32"] == 4_000_000_000 and md["i32"] == -2_000_000_000
    assert md["f32"] == 1e-5 and md["bool"] is True and md["str"] == "héllo wörld ✓"
    assert md["u64"] == 1 << 40 and md["i64"] == -(1 << 40) and md["f64"] == 3.141592653589793
    assert md["arr.str"] == ["a", "", "<0x0A>", "▁the"]
    np.testing.assert_array_equal(md["arr.f32"], [0.5, -1.25, 3.0])
    np.testing.assert_array_equal(md["arr.i32"], [1, -2, 3])
    np.testing.assert_array_equal(md["arr.bool"], [True, False, True])
    assert [list(x) for x in md["arr.nested"]] == [[1, 2], [3]]
    assert len(md["arr.empty"]) == 0
    assert r.value_types["u8"] == (ValueType.UINT8, None)
    assert r.value_types["arr.str"] == (ValueType.ARRAY, ValueType.STRING)
    names = [t.name for t in r.tensors]
    assert names == ["f32.matrix", "f16.vec", "q4_0.matrix", "lazy.f32"]
    m = r.tensor("f32.matrix")
    assert m.type == GGMLType.F32 and m.dims == (8, 3) and m.shape == (3, 8)
    assert m.data.shape == (3, 8) and m.data.dtype == np.float32
    q = r.tensor("q4_0.matrix")
    assert q.data.shape == (2, 36) and q.nbytes == 72
    assert all(t.offset % 32 == 0 for t in r.tensors)
    np.testing.assert_array_equal(r.tensor("lazy.f32").data, np.ones((4, 32), np.float32))


def test_tensor_views_are_zero_copy(sample_file: Path) -> None:
    r = GGUFReader(sample_file)
    t = r.tensor("f32.matrix")
    # a view of the file's mapping at the tensor's offset, in numpy and as a memoryview
    mapping = np.frombuffer(r._buf, np.uint8)
    assert t.raw.ctypes.data == mapping.ctypes.data + t.offset
    assert np.frombuffer(t.view, np.uint8).ctypes.data == t.raw.ctypes.data
    assert t.view.readonly and t.view.nbytes == t.nbytes
    assert not t.data.flags.writeable
    with pytest.raises(ValueError):
        t.data[0, 0] = 1.0


def test_writer_rewrite_is_identical(sample_file: Path, tmp_path: Path) -> None:
    r = GGUFReader(sample_file)
    w = GGUFWriter(tmp_path / "copy.gguf")
    w.add_metadata(r.metadata, r.value_types)
    for t in r.tensors:
        w.add_tensor(t.name, t.raw, t.type, t.dims)
    w.write()
    assert (tmp_path / "copy.gguf").read_bytes() == sample_file.read_bytes()


def test_gguf_package_reads_our_file(sample_file: Path) -> None:
    g = gguf.GGUFReader(sample_file)
    ours = GGUFReader(sample_file)
    for key in ("u32", "i16", "str", "f32", "bool"):
        field = g.fields[key]
        value = field.contents() if hasattr(field, "contents") else field.parts[field.data[0]]
        expected = ours.metadata[key]
        if isinstance(expected, float):
            assert value == pytest.approx(expected)
        else:
            assert value == expected, key
    assert g.fields["arr.str"].contents() == ["a", "", "<0x0A>", "▁the"]
    for gt, ot in zip(g.tensors, ours.tensors, strict=True):
        assert gt.name == ot.name
        assert tuple(int(x) for x in gt.shape) == ot.dims
        assert int(gt.tensor_type) == int(ot.type)
        np.testing.assert_array_equal(np.asarray(gt.data).reshape(-1).view(np.uint8), ot.raw)


def test_we_read_gguf_package_file(tmp_path: Path) -> None:
    path = tmp_path / "theirs.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 30)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_string("general.name", "x")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a b"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.0])
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    data = np.arange(24, dtype=np.float32).reshape(2, 12)
    w.add_tensor("t", data)
    w.add_tensor("h", np.ones(16, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = GGUFReader(path)
    assert r.metadata["general.architecture"] == "llama"
    assert r.metadata["llama.block_count"] == 30
    assert r.metadata["tokenizer.ggml.tokens"] == ["<s>", "</s>", "a b"]
    np.testing.assert_array_equal(r.metadata["tokenizer.ggml.scores"], [0.0, -1.5, 2.0])
    assert r.metadata["tokenizer.ggml.add_bos_token"] is True
    np.testing.assert_array_equal(r.tensor("t").data, data)
    assert r.tensor("h").type == GGMLType.F16


def test_real_model_matches_gguf_package(smollm2_path: Path) -> None:
    ours = GGUFReader(smollm2_path)
    g = gguf.GGUFReader(smollm2_path)
    assert len(ours.tensors) == len(g.tensors) == 272
    assert ours.metadata["llama.block_count"] == 30
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    for a, b in zip(ours.tensors, g.tensors, strict=True):
        assert a.name == b.name and a.offset == b.data_offset
        assert a.dims == tuple(int(x) for x in b.shape) and int(a.type) == int(b.tensor_type)
    assert {t.type.name for t in ours.tensors} == {"Q4_1", "Q8_0", "F32"}


def test_atomic_write_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "out.gguf"
    path.write_bytes(b"previous content")

    def boom() -> np.ndarray:
        raise RuntimeError("producer failed")

    w = GGUFWriter(path)
    w.add_kv("general.architecture", "llama")
    w.add_tensor("a", np.zeros(32, np.float32))
    w.add_tensor("b", boom, GGMLType.F32, dims=(32,))
    with pytest.raises(RuntimeError):
        w.write()
    assert path.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


@pytest.mark.parametrize("bad", [
    lambda w: w.add_kv("", 1),
    lambda w: w.add_kv("general.architecture", "again"),
    lambda w: w.add_tensor("x", np.zeros(3, np.uint8), GGMLType.Q4_0, dims=(3,)),
    lambda w: w.add_tensor("x", np.zeros(10, np.uint8), GGMLType.Q4_0, dims=(32,)),
    lambda w: w.add_tensor("x", np.zeros(4, np.complex64)),
    lambda w: [w.add_tensor("x", np.zeros(4, np.float32)) for _ in range(2)],
    lambda w: w.add_kv("k", object()),
])
def test_writer_rejects_bad_input(tmp_path: Path, bad) -> None:  # type: ignore[no-untyped-def]
    w = GGUFWriter(tmp_path / "x.gguf")
    w.add_kv("general.architecture", "llama")
    with pytest.raises(GGUFError):
        bad(w)


def test_writer_rejects_bad_alignment(tmp_path: Path) -> None:
    with pytest.raises(GGUFError):
        GGUFWriter(tmp_path / "x.gguf", alignment=24)


# ---- malformed corpus ---------------------------------------------------------------------------

def malformed_cases() -> dict[str, bytes]:
    """name -> bytes of a file that must be rejected (each one kind of defect)."""
    ok = f32_tensor_file()
    cases: dict[str, bytes] = {}

    def case(name: str, c: Crafted) -> None:
        cases[name] = c.build()

    def variant(**kw: object) -> Crafted:
        c = f32_tensor_file()
        for k, v in kw.items():
            setattr(c, k, v)
        return c

    cases["empty"] = b""
    cases["bad-magic"] = b"GGML" + ok.build()[4:]
    case("version-1", variant(version=1))
    case("version-4", variant(version=4))
    cases["big-endian"] = b"GGUF" + struct.pack(">I", 3) + ok.build()[8:]
    case("kv-count-too-large", variant(n_kv=1 << 60))
    case("tensor-count-too-large", variant(n_tensors=1 << 60))
    case("kv-count-lies", variant(n_kv=5))
    case("string-length-past-eof",
         variant(kvs=[gstr("name") + struct.pack("<I", 8) + struct.pack("<Q", 1 << 50)]))
    case("key-length-past-eof", variant(kvs=[struct.pack("<Q", 1 << 40) + b"k"]))
    case("array-length-past-eof", variant(kvs=[kv_raw("arr", 9, struct.pack("<IQ", 6, 1 << 40))]))
    case("string-array-length-past-eof",
         variant(kvs=[kv_raw("arr", 9, struct.pack("<IQ", 8, 1 << 40))]))
    case("nested-array-length-past-eof",
         variant(kvs=[kv_raw("arr", 9, struct.pack("<IQ", 9, 1 << 40))]))
    case("unknown-value-type", variant(kvs=[kv_raw("k", 13, b"\0" * 8)]))
    case("unknown-array-element-type", variant(kvs=[kv_raw("k", 9, struct.pack("<IQ", 99, 1))]))
    case("empty-key", variant(kvs=[kv_u32("", 1)]))
    case("duplicate-key", variant(kvs=[kv_u32("a", 1), kv_u32("a", 2)]))
    case("key-not-utf8", variant(kvs=[gstr(b"\xff\xfe") + struct.pack("<II", 4, 1)]))
    case("duplicate-tensor", variant(tensors=[TInfo("w", [8], 0, 0), TInfo("w", [8], 0, 32)],
                                     data=b"\0" * 64))
    case("empty-tensor-name", variant(tensors=[TInfo("", [8], 0, 0)]))
    case("n-dims-0", variant(tensors=[TInfo("w", [], 0, 0)]))
    case("n-dims-5", variant(tensors=[TInfo("w", [1, 1, 1, 1, 8], 0, 0)]))
    case("dim-zero", variant(tensors=[TInfo("w", [8, 0], 0, 0)]))
    case("dim-negative", variant(tensors=[TInfo("w", [8, (1 << 64) - 1], 0, 0)]))
    case("element-count-overflow", variant(tensors=[TInfo("w", [1 << 31, 1 << 31, 1 << 31], 0, 0)]))
    case("byte-count-past-eof", variant(tensors=[TInfo("w", [1 << 40], 0, 0)]))
    case("unknown-ggml-type", variant(tensors=[TInfo("w", [8], 31, 0)]))
    case("row-not-whole-blocks", variant(tensors=[TInfo("w", [16], int(GGMLType.Q4_0), 0)]))
    case("misaligned-offset", variant(tensors=[TInfo("w", [4], 0, 4)]))
    case("data-past-eof", variant(tensors=[TInfo("w", [8], 0, 32)]))
    case("overlapping-tensors", variant(tensors=[TInfo("a", [16], 0, 0), TInfo("b", [8], 0, 32)],
                                        data=b"\0" * 64))
    case("alignment-not-power-of-two",
         variant(kvs=[kv_str("general.architecture", "llama"), kv_u32("general.alignment", 24)]))
    case("alignment-zero",
         variant(kvs=[kv_str("general.architecture", "llama"), kv_u32("general.alignment", 0)]))
    case("alignment-wrong-type",
         variant(kvs=[kv_str("general.architecture", "llama"),
                      kv_raw("general.alignment", 8, gstr("32"))]))
    deep = struct.pack("<IQ", 9, 1) * 40 + struct.pack("<IQ", 4, 0)
    case("array-nesting-too-deep", variant(kvs=[kv_raw("deep", 9, deep)]))
    case("truncated-data", variant(data=ok.data[:-1]))
    return cases


MALFORMED = malformed_cases()


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_file_rejected(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(MALFORMED[name])
    with pytest.raises(GGUFError) as info:
        GGUFReader(path)
    assert str(path) in str(info.value)


def test_valid_craft_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "ok.gguf"
    path.write_bytes(f32_tensor_file().build())
    r = GGUFReader(path)
    np.testing.assert_array_equal(r.tensor("w").data, np.arange(8, dtype=np.float32))


def test_every_truncation_is_rejected(tmp_path: Path) -> None:
    full = tmp_path / "full.gguf"
    _sample_writer(full).write()
    data = full.read_bytes()
    GGUFReader(full)  # the whole file is valid
    path = tmp_path / "cut.gguf"
    for n in range(len(data)):
        path.write_bytes(data[:n])
        with pytest.raises(GGUFError):
            GGUFReader(path)


def test_bad_messages_name_the_problem(tmp_path: Path) -> None:
    expectations = {
        "bad-magic": "bad magic",
        "version-4": "unsupported GGUF version 4",
        "duplicate-key": "duplicate metadata key 'a'",
        "unknown-ggml-type": "unknown ggml type 31",
        "misaligned-offset": "not a multiple of the alignment",
        "overlapping-tensors": "overlap",
        "row-not-whole-blocks": "whole number of Q4_0 blocks",
        "alignment-not-power-of-two": "not a positive power of two",
    }
    for name, text in expectations.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(MALFORMED[name])
        with pytest.raises(GGUFError, match=text):
            GGUFReader(path)


def test_version_2_is_read(tmp_path: Path) -> None:
    c = f32_tensor_file()
    c.version = 2
    path = tmp_path / "v2.gguf"
    path.write_bytes(c.build())
    r = GGUFReader(path)
    assert r.version == 2
    np.testing.assert_array_equal(r.tensor("w").data, np.arange(8, dtype=np.float32))
