"""Importance matrices (pyllm/formats/imatrix.py): llama.cpp's GGUF and legacy .dat files, read
and written interchangeably.

The golden files in tests/data/llamacpp_imatrix/ are what llama.cpp's ``llama-imatrix`` wrote
for a tiny random model with SmolLM2's vocabulary (``vocab_model``: deterministic from seeds) on
the first chunks of tests/data/english.txt, in both formats, from one and the same computation;
tests/data/make_llamacpp_imatrix_golden.py made them and says how. pyllm writing llama.cpp's
exact bytes back out (GGUF, and .dat from the GGUF's sums) is the proof that llama.cpp reads
pyllm's files: they are its own.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from pyllm.errors import QuantError
from pyllm.formats.gguf import GGUFReader, GGUFWriter
from pyllm.formats.imatrix import Imatrix, ImatrixEntry, read_imatrix, write_imatrix
from tests.tiny_models import TinySpec, write_tiny

GOLDEN = Path(__file__).parent / "data" / "llamacpp_imatrix"
GOLDEN_GGUF = GOLDEN / "tiny.imatrix.gguf"
GOLDEN_DAT = GOLDEN / "tiny.imatrix.dat"
# How the golden files were computed (make_llamacpp_imatrix_golden.py passes these to
# llama-imatrix): context (chunk size) and number of chunks.
GOLDEN_CTX, GOLDEN_CHUNKS = 64, 3
VOCAB_SPEC = TinySpec(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, n_vocab=49152,
                      seed=20261203)
# pyllm's sums against llama.cpp's on the golden run, worst relative difference per entry: with
# llama.cpp's F16 K/V cache measured 8.1e-5 (F32 rounding of the two forwards); pyllm imatrix
# keeps K/V in F32 (the exact model), which moves them by up to 1.5e-3 (ffn_down) from llama.cpp's.
IMATRIX_RTOL_F16_KV = 2e-4
IMATRIX_RTOL = 3e-3
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def vocab_model(vocab_gguf: Path, dst: Path) -> Path:
    """A tiny random Llama (VOCAB_SPEC) carrying the tokenizer of ``vocab_gguf`` (SmolLM2), so
    that llama.cpp's tools can tokenize text for it."""
    raw = write_tiny(dst.with_name(dst.name + ".raw"), VOCAB_SPEC)
    with GGUFReader(vocab_gguf) as voc, GGUFReader(raw) as r:
        w = GGUFWriter(dst)
        w.add_metadata(r.metadata, r.value_types)
        w.add_metadata({k: v for k, v in voc.metadata.items() if k.startswith("tokenizer.")},
                       voc.value_types)
        assert len(voc.metadata["tokenizer.ggml.tokens"]) == VOCAB_SPEC.n_vocab
        for t in r.tensors:
            w.add_tensor(t.name, np.array(t.data), t.type, t.dims)
        w.write()
    raw.unlink()
    return dst


def expected_names(n_layer: int) -> set[str]:
    return {f"blk.{i}.{m}.weight" for i in range(n_layer) for m in MATRICES}


# ---- llama.cpp's golden files ------------------------------------------------------------------


def test_reads_llama_cpps_gguf_imatrix() -> None:
    im = read_imatrix(GOLDEN_GGUF)
    assert set(im.entries) == expected_names(VOCAB_SPEC.n_layer)  # output.weight: not by default
    assert (im.chunk_count, im.chunk_size) == (GOLDEN_CHUNKS, GOLDEN_CTX)
    assert len(im.datasets) == 1 and im.datasets[0].endswith("english.txt")
    d, ff = VOCAB_SPEC.n_embd, VOCAB_SPEC.n_ff
    for name, e in im.entries.items():
        n_in = ff if "ffn_down" in name else d
        assert e.sums.shape == (1, n_in) and e.counts.tolist() == [GOLDEN_CTX * GOLDEN_CHUNKS]
        assert (e.sums > 0).all()
    # q, k and v read the same activations: llama.cpp records them once per matrix, equal
    for i in range(VOCAB_SPEC.n_layer):
        q = im.weights(f"blk.{i}.attn_q.weight")
        assert q is not None
        np.testing.assert_array_equal(q, im.weights(f"blk.{i}.attn_k.weight"))
        np.testing.assert_array_equal(q, im.weights(f"blk.{i}.attn_v.weight"))


def test_writes_llama_cpps_gguf_bytes(tmp_path: Path) -> None:
    im = read_imatrix(GOLDEN_GGUF)
    write_imatrix(im, tmp_path / "again.gguf")
    assert (tmp_path / "again.gguf").read_bytes() == GOLDEN_GGUF.read_bytes()


def test_writes_llama_cpps_dat_bytes(tmp_path: Path) -> None:
    """The .dat llama.cpp wrote from the same computation, from the GGUF's sums and counts."""
    im = read_imatrix(GOLDEN_GGUF)
    write_imatrix(im, tmp_path / "again.dat", legacy=True)
    assert (tmp_path / "again.dat").read_bytes() == GOLDEN_DAT.read_bytes()


def test_reads_llama_cpps_dat_imatrix() -> None:
    dat, gguf = read_imatrix(GOLDEN_DAT, chunk_size=GOLDEN_CTX), read_imatrix(GOLDEN_GGUF)
    assert set(dat.entries) == set(gguf.entries)
    assert dat.chunk_count == GOLDEN_CHUNKS and dat.datasets == gguf.datasets
    for name in gguf.entries:
        a, b = dat.weights(name), gguf.weights(name)
        assert a is not None and b is not None
        # .dat stores mean * ncall in float32: one more rounding
        np.testing.assert_allclose(a, b, rtol=3e-7, atol=0)
    # another chunk size scales sums and counts alike: the weights do not change
    other = read_imatrix(GOLDEN_DAT, chunk_size=512)
    name = next(iter(gguf.entries))
    np.testing.assert_array_equal(other.weights(name), dat.weights(name))


# ---- pyllm's own files -------------------------------------------------------------------------


def _random_imatrix(seed: int = 0) -> Imatrix:
    rng = np.random.default_rng(seed)
    im = Imatrix(datasets=["a.txt", "b.txt"], chunk_count=5, chunk_size=128)
    im.entries["blk.0.attn_q.weight"] = ImatrixEntry(
        rng.uniform(0, 9, (1, 64)).astype(np.float32), np.array([640]))
    im.entries["blk.0.ffn_gate_exps.weight"] = ImatrixEntry(  # stacked experts, one unused
        rng.uniform(0, 9, (4, 32)).astype(np.float32), np.array([100, 0, 300, 240]))
    return im


def test_round_trip_and_expert_counts(tmp_path: Path) -> None:
    im = _random_imatrix()
    write_imatrix(im, tmp_path / "m.gguf")
    back = read_imatrix(tmp_path / "m.gguf")
    assert back.datasets == im.datasets and (back.chunk_count, back.chunk_size) == (5, 128)
    for name, e in im.entries.items():
        np.testing.assert_array_equal(back.entries[name].sums, e.sums)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)
    w = back.weights("blk.0.ffn_gate_exps.weight")
    assert w is not None and w.shape == (4, 32)
    np.testing.assert_array_equal(w[1], np.ones(32, np.float32))  # no tokens: uniform weights
    np.testing.assert_allclose(w[2], im.entries["blk.0.ffn_gate_exps.weight"].sums[2] / 300,
                               rtol=1e-7)
    assert back.weights("blk.9.attn_q.weight") is None


def test_accumulate_and_merge() -> None:
    im = Imatrix(chunk_size=4)
    im.add("w", np.array([1.0, 4.0]), 2)
    im.add("w", np.array([3.0, 0.0]), 2)
    np.testing.assert_array_equal(im.weights("w"), [1.0, 1.0])
    other = Imatrix(entries={"w": ImatrixEntry(np.array([[4.0, 4.0]], np.float32),
                                               np.array([4]))}, chunk_count=1)
    im.merge(other)
    np.testing.assert_array_equal(im.weights("w"), [1.0, 1.0])
    assert im.entries["w"].counts.tolist() == [8]
    with pytest.raises(QuantError, match="shape"):
        im.add("w", np.ones(3), 1)


def test_malformed_files_are_quant_errors(tmp_path: Path) -> None:
    good = GOLDEN_DAT.read_bytes()
    cases = {
        "empty": b"",
        "zero-entries": struct.pack("<i", 0),
        "truncated": good[: len(good) // 2],
        "huge-name": struct.pack("<ii", 1, 1 << 30),
        "bad-count": struct.pack("<ii", 1, 1) + b"w" + struct.pack("<ii", 1, -5),
        "nan": struct.pack("<ii", 1, 1) + b"w" + struct.pack("<ii", 1, 1)
        + struct.pack("<f", float("nan")),
    }
    for label, data in cases.items():
        p = tmp_path / f"{label}.dat"
        p.write_bytes(data)
        with pytest.raises(QuantError, match=str(p)):
            read_imatrix(p)
    # a GGUF that is not an importance matrix (a model) and one missing a counts tensor
    model = write_tiny(tmp_path / "model.gguf", TinySpec())
    with pytest.raises(QuantError, match="metadata"):
        read_imatrix(model)
    w = GGUFWriter(tmp_path / "half.gguf")
    w.add_kv("general.type", "imatrix")
    w.add_kv("imatrix.datasets", ["x"])
    w.add_kv("imatrix.chunk_count", 1)
    w.add_kv("imatrix.chunk_size", 8)
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, 8), np.float32))
    w.write()
    with pytest.raises(QuantError, match="counts"):
        read_imatrix(tmp_path / "half.gguf")
    with pytest.raises(QuantError, match="cannot read"):
        read_imatrix(tmp_path / "missing.gguf")


def test_write_is_atomic_and_checked(tmp_path: Path) -> None:
    with pytest.raises(QuantError, match="no entries"):
        write_imatrix(Imatrix(), tmp_path / "x.gguf")
    with pytest.raises(QuantError):
        write_imatrix(_random_imatrix(), tmp_path / "no" / "such" / "dir.gguf")
    src = tmp_path / "model.gguf"
    src.write_bytes(b"model")
    with pytest.raises(QuantError):
        write_imatrix(_random_imatrix(), src, sources=[src])
    assert src.read_bytes() == b"model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


# ---- computing one (pyllm imatrix) -------------------------------------------------------------

TEXT = Path(__file__).parent / "data" / "english.txt"


@pytest.fixture(scope="module")
def vocab_tiny(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return vocab_model(smollm2_path, tmp_path_factory.mktemp("imatrix") / "vocab-tiny.gguf")


def _run_imatrix(model: Path, out: Path, *extra: str) -> None:
    from tests.test_cli import run_cli

    proc = run_cli("imatrix", "-m", str(model), "-f", str(TEXT), "-c", str(GOLDEN_CTX),
                   "-o", str(out), "--quiet", *extra, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and out.name in proc.stdout


def _worst(ours: Imatrix, theirs: Imatrix) -> float:
    assert set(ours.entries) == set(theirs.entries)
    assert (ours.chunk_count, ours.chunk_size) == (theirs.chunk_count, theirs.chunk_size)
    worst = 0.0
    for name, e in theirs.entries.items():
        np.testing.assert_array_equal(ours.entries[name].counts, e.counts)
        worst = max(worst, float((np.abs(ours.entries[name].sums - e.sums) / e.sums).max()))
    return worst


def test_pyllm_imatrix_matches_llama_cpps(vocab_tiny: Path, tmp_path: Path) -> None:
    """The same model, text, chunking and tokens as the golden file: the same entries and
    counts, and the same sums to F32 rounding with llama.cpp's F16 K/V cache; the CLI (F32 K/V)
    within what that cache's rounding moves them."""
    from pyllm.runtime.llm import LLM
    from pyllm.tools.imatrix import compute_imatrix
    from pyllm.tools.perplexity import tokenize_text

    theirs = read_imatrix(GOLDEN_GGUF)
    with LLM(vocab_tiny, n_ctx=GOLDEN_CTX, n_batch=GOLDEN_CTX, kv_type="f16") as llm:
        toks = tokenize_text(llm, TEXT.read_text(encoding="utf-8"))
        ours = compute_imatrix(llm, toks, GOLDEN_CTX, n_chunks=GOLDEN_CHUNKS)
        # negative control: two chunks instead of three is far outside the bounds
        two = compute_imatrix(llm, toks, GOLDEN_CTX, n_chunks=2)
    assert _worst(ours, theirs) < IMATRIX_RTOL_F16_KV
    name = "blk.1.ffn_down.weight"
    rel = np.abs(two.weights(name) - theirs.weights(name)) / theirs.weights(name)
    assert rel.max() > 10 * IMATRIX_RTOL
    out = tmp_path / "ours.gguf"
    _run_imatrix(vocab_tiny, out, "--chunks", str(GOLDEN_CHUNKS))
    assert _worst(read_imatrix(out), theirs) < IMATRIX_RTOL


def test_imatrix_cli_formats_merge_and_output(vocab_tiny: Path, tmp_path: Path) -> None:
    _run_imatrix(vocab_tiny, tmp_path / "a.dat", "--chunks", "2", "--process-output")
    dat = read_imatrix(tmp_path / "a.dat", chunk_size=GOLDEN_CTX)
    assert "output.weight" in dat.entries and len(dat.entries) == 7 * VOCAB_SPEC.n_layer + 1
    _run_imatrix(vocab_tiny, tmp_path / "b.gguf", "--chunks", "1", "--in-file",
                 str(tmp_path / "a.dat"))
    merged = read_imatrix(tmp_path / "b.gguf")
    assert merged.entries["blk.0.attn_q.weight"].counts.tolist() == [3 * GOLDEN_CTX]
    assert merged.chunk_count == 3


def test_imatrix_cli_errors(vocab_tiny: Path, tmp_path: Path) -> None:
    from tests.test_cli import run_cli

    short = tmp_path / "short.txt"
    short.write_text("Too short.", encoding="utf-8")
    proc = run_cli("imatrix", "-m", str(vocab_tiny), "-f", str(short), "-c", "64",
                   "-o", str(tmp_path / "x.gguf"))
    assert proc.returncode == 1 and proc.stderr.startswith("error:")
    assert "at least 128" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("imatrix", "-m", str(vocab_tiny), "-o", str(tmp_path / "x.gguf"))
    assert proc.returncode == 2 and "-f/--file" in proc.stderr
    proc = run_cli("imatrix", "-m", str(vocab_tiny), "-f", str(TEXT),
                   "-o", str(tmp_path / "no" / "dir.gguf"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert not (tmp_path / "x.gguf").exists()
