"""Split GGUF models: reading shards as one model (pyllm/formats/gguf/split.py) and
``pyllm split`` / ``pyllm merge`` (pyllm/tools/split.py), against the unsplit file and against
llama.cpp: its Python writer (the ``gguf`` package's ``split_max_tensors``, what
convert_hf_to_gguf.py --split-max-tensors uses) run live, and its loader on pyllm's shards
(figures in tests/data/llamacpp_split_figures.json, made by
tests/data/make_llamacpp_split_figures.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pyllm.errors import GGUFError
from pyllm.formats.gguf import GGUFReader
from pyllm.formats.gguf.split import SplitGGUFReader, open_gguf, parse_shard_name, shard_name
from pyllm.runtime.llm import LLM
from pyllm.tools.split import merge_model, parse_size, plan_shards, split_model
from tests.test_cli import run_cli
from tests.test_quantize import file_sha256 as sha256
from tests.tiny_models import TinySpec, write_tiny

PROMPT = [1, 504, 3458, 282, 4649, 314]
SPLIT_FIGURES = Path(__file__).parent / "data" / "llamacpp_split_figures.json"
SMOL_SPLIT = "40M"  # SmolLM2 Q4_1 (94 MiB) in three shards


@pytest.fixture(scope="module")
def smol_split(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("split")
    return split_model(smollm2_path, folder / "smol", max_size=parse_size(SMOL_SPLIT))


def test_a_split_model_loads_from_any_shard(smollm2_path: Path, smol_split: list[Path]) -> None:
    assert [p.name for p in smol_split] == [f"smol-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    with LLM(smollm2_path, n_ctx=64) as llm:
        want = llm.logits(PROMPT)
        text = llm.generate("The capital of France is", max_tokens=8, temperature=0)
    for shard in smol_split:
        with LLM(shard, n_ctx=64) as llm:
            assert np.array_equal(llm.logits(PROMPT), want), shard.name
            assert llm.generate("The capital of France is", max_tokens=8, temperature=0) == text
    with open_gguf(smol_split[1]) as reader, GGUFReader(smollm2_path) as whole:
        assert isinstance(reader, SplitGGUFReader)
        assert [t.name for t in reader] == [t.name for t in whole]
        # the split.* keys are not the model's: the metadata is the unsplit file's
        assert reader.metadata.keys() == whole.metadata.keys()
        assert all(np.array_equal(v, whole.metadata[k]) if isinstance(v, np.ndarray)
                   else v == whole.metadata[k] for k, v in reader.metadata.items())
        # zero-copy: each tensor is a view of its own shard's mapping
        last = reader.tensors[-1]
        mapping = np.frombuffer(reader.shards[-1]._buf, np.uint8)
        assert last.raw.ctypes.data == mapping.ctypes.data + last.offset
        assert np.array_equal(last.raw, whole.tensor(last.name).raw)
        # a tensor's file is its own shard's, the bytes there the view's
        opened = reader.open_tensor_file(last.name)
        assert opened is not None
        fd, offset = opened
        try:
            assert os.fstat(fd).st_ino == os.stat(smol_split[-1]).st_ino
            assert os.pread(fd, 256, offset) == bytes(last.view[:256])
        finally:
            os.close(fd)
        with pytest.raises(GGUFError, match="no tensor named"):
            reader.open_tensor_file("nope.weight")
    # each shard alone is a GGUF holding its run of tensors and the split keys
    counts = [len(GGUFReader(p).tensors) for p in smol_split]
    assert sum(counts) == len(GGUFReader(smollm2_path).tensors) and min(counts) > 0
    for i, p in enumerate(smol_split):
        md = GGUFReader(p).metadata
        assert (md["split.no"], md["split.count"], md["split.tensors.count"]) == (i, 3,
                                                                                   sum(counts))
        assert ("tokenizer.ggml.tokens" in md) == (i == 0)  # the metadata is in the first


def test_merge_gives_back_the_file_byte_for_byte(smollm2_path: Path, smol_split: list[Path],
                                                 tmp_path: Path) -> None:
    out = merge_model(smol_split[2], tmp_path / "merged.gguf")
    assert sha256(out) == sha256(smollm2_path)


def test_shard_plans_follow_gguf_split(tmp_path: Path) -> None:
    path = write_tiny(tmp_path / "m.gguf", TinySpec(n_layer=3))
    with GGUFReader(path) as r:
        tensors, align = r.tensors, r.alignment
    by_count = plan_shards(tensors, align, max_tensors=5)
    assert [len(s) for s in by_count[:-1]] == [5] * (len(by_count) - 1)
    assert [t.name for s in by_count for t in s] == [t.name for t in tensors]
    assert len(plan_shards(tensors, align)) == 1  # default 128 tensors per shard
    # by size: no shard's padded tensor bytes pass the limit, unless one tensor alone does
    sizes = [-(-t.nbytes // align) * align for t in tensors]
    limit = max(sizes) // 2
    shards = plan_shards(tensors, align, max_size=limit)
    for s in shards:
        total = sum(-(-t.nbytes // align) * align for t in s)
        assert total <= limit or len(s) == 1
    big = [s for s in shards if len(s) == 1 and s[0].nbytes > limit]
    assert big, "a tensor larger than the limit gets a shard of its own"
    with pytest.raises(GGUFError, match="not both"):
        plan_shards(tensors, align, max_size=100, max_tensors=2)
    assert parse_size("500M") == 500_000_000 and parse_size("2g") == 2_000_000_000
    for bad in ("12", "0M", "1.5G", "2T"):
        with pytest.raises(GGUFError, match="expected a positive number of M or G"):
            parse_size(bad)
    assert shard_name("a/b", 0, 3) == "a/b-00001-of-00003.gguf"
    assert parse_shard_name("x/m-00002-of-00003.gguf") == ("m", 1, 3)
    assert parse_shard_name("m-2-of-3.gguf") is None


def test_llama_cpp_python_writer_shards_load(tmp_path: Path) -> None:
    """Shards written by llama.cpp's own Python writer (gguf-py, split_max_tensors) load, with
    the logits of the unsplit model."""
    import gguf

    path = write_tiny(tmp_path / "m.gguf", TinySpec(n_layer=3))
    with GGUFReader(path) as r:
        w = gguf.GGUFWriter(tmp_path / "theirs.gguf", r.metadata["general.architecture"],
                            split_max_tensors=7)
        for key, value in r.metadata.items():
            if key == "general.architecture":
                continue  # the writer adds it
            vt, et = r.value_types[key]
            w.add_key_value(key, value, gguf.GGUFValueType(int(vt)),
                            None if et is None else gguf.GGUFValueType(int(et)))
        for t in r:
            w.add_tensor(t.name, np.array(t.data))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    shards = sorted(tmp_path.glob("theirs-*-of-*.gguf"))
    assert len(shards) >= 3
    with LLM(path, n_ctx=32) as llm:
        want = llm.logits([1, 5, 77, 12])
    with LLM(shards[-1], n_ctx=32) as llm:
        assert np.array_equal(llm.logits([1, 5, 77, 12]), want)


def _tiny_split(folder: Path, seed: int = 0, n: int = 5) -> list[Path]:
    folder.mkdir(exist_ok=True)
    path = write_tiny(folder / f"src{seed}.gguf", TinySpec(n_layer=2, seed=seed))
    return split_model(path, folder / "m", max_tensors=n)


def test_shards_that_do_not_belong_are_named(tmp_path: Path) -> None:
    shards = _tiny_split(tmp_path / "a")
    n = len(shards)
    assert n >= 3
    # missing
    moved = shards[1].with_suffix(".away")
    shards[1].rename(moved)
    with pytest.raises(GGUFError, match=rf"{shards[1].name} of the {n} is missing"):
        open_gguf(shards[0])
    moved.rename(shards[1])
    # reordered: two shards swap names
    tmp = shards[0].with_suffix(".tmp")
    shards[0].rename(tmp)
    shards[1].rename(shards[0])
    tmp.rename(shards[1])
    with pytest.raises(GGUFError, match="renamed shard|renamed or reordered"):
        open_gguf(shards[0])
    with pytest.raises(GGUFError, match="renamed shard|renamed or reordered"):
        open_gguf(shards[2])
    shards = _tiny_split(tmp_path / "b")
    # mismatched: the same position of another model's split into as many shards
    other_model = write_tiny(tmp_path / "o.gguf", TinySpec(n_layer=3))
    with GGUFReader(other_model) as r:
        per_shard = next(k for k in range(1, 100)
                         if len(plan_shards(r.tensors, r.alignment, max_tensors=k)) == n)
    (tmp_path / "o").mkdir()
    other = split_model(other_model, tmp_path / "o" / "m", max_tensors=per_shard)
    os.replace(other[1], shards[1])
    with pytest.raises(GGUFError, match=rf"{shards[1].name}: split.tensors.count"):
        open_gguf(shards[0])
    # extra: another split of the same prefix beside this one
    shards = _tiny_split(tmp_path / "c")
    more = split_model(tmp_path / "c" / "src0.gguf", tmp_path / "c" / "m", max_tensors=3)
    assert len(more) != len(shards)
    with pytest.raises(GGUFError, match="a shard of another split of 'm'"):
        open_gguf(shards[0])
    # renamed out of the pattern
    shards = _tiny_split(tmp_path / "d")
    renamed = shards[0].with_name("model.gguf")
    shards[0].rename(renamed)
    with pytest.raises(GGUFError, match="cannot be found"):
        open_gguf(renamed)
    # a shard is not split again; a whole file is not merged
    with pytest.raises(GGUFError, match="already a shard"):
        split_model(shards[1], tmp_path / "again")
    with pytest.raises(GGUFError, match="not a shard of a split model"):
        merge_model(tmp_path / "c" / "src0.gguf", tmp_path / "x.gguf")


def test_a_failed_split_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyllm.formats.gguf import GGUFWriter

    path = write_tiny(tmp_path / "m.gguf", TinySpec(n_layer=2))
    real = GGUFWriter.write
    calls = []

    def failing(self: GGUFWriter) -> None:
        calls.append(self.path)
        if len(calls) == 3:
            raise GGUFError("disk full (simulated)")
        real(self)

    monkeypatch.setattr(GGUFWriter, "write", failing)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(GGUFError, match="simulated"):
        split_model(path, out / "m", max_tensors=4)
    assert len(calls) == 3 and list(out.iterdir()) == []  # no shard, no temp file


def test_cli_split_and_merge(smollm2_path: Path, tmp_path: Path) -> None:
    res = run_cli("split", str(smollm2_path), str(tmp_path / "s"), "--max-tensors", "100",
                  timeout=300)
    assert res.returncode == 0, res.stderr
    shards = sorted(tmp_path.glob("s-*-of-*.gguf"))
    assert len(shards) == 3 and res.stdout.count("wrote ") == 3
    info = run_cli("info", str(shards[0]), "--no-tensors")
    assert info.returncode == 0 and "shards:        3" in info.stdout
    res = run_cli("merge", str(shards[0]), str(tmp_path / "m.gguf"), timeout=300)
    assert res.returncode == 0, res.stderr
    assert sha256(tmp_path / "m.gguf") == sha256(smollm2_path)
    bad = run_cli("split", str(smollm2_path), str(tmp_path / "t"), "--max-size", "2T")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --max-size")
    bad = run_cli("split", str(smollm2_path), str(tmp_path / "t"), "--max-size", "1G",
                  "--max-tensors", "3")
    assert bad.returncode == 2 and "not allowed with" in bad.stderr
    shards[1].unlink()
    bad = run_cli("run", "-m", str(shards[0]), "-p", "hi", "-n", "1")
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "missing" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_llama_cpp_loads_our_shards(smollm2_path: Path, smol_split: list[Path]) -> None:
    """llama.cpp (llama-cpp-python 0.3.36, by the figures' script) loaded the shards pyllm
    writes for SmolLM2 at 40M and gave the logits it gives the unsplit file. The shards pyllm
    writes now are those bytes (their hashes), so llama.cpp loads these too."""
    figures = json.loads(SPLIT_FIGURES.read_text(encoding="utf-8"))
    assert figures["max_size"] == SMOL_SPLIT
    assert [sha256(p) for p in smol_split] == figures["shard_sha256"]
    assert figures["split"]["logits"] == figures["whole"]["logits"]
    assert figures["split"]["ids"] == figures["whole"]["ids"]
    with LLM(smol_split[0], n_ctx=64) as llm:
        assert int(np.argmax(llm.logits(PROMPT)[-1])) == figures["split"]["ids"][0]


def test_quantize_reads_a_split_model(tmp_path: Path) -> None:
    """Every tool that reads a model takes a split one: quantize writes the file the unsplit
    source gives (one file, without the split keys)."""
    from pyllm.tools.quantize import quantize_file

    path = write_tiny(tmp_path / "m.gguf", TinySpec(n_layer=2, n_embd=64))
    shards = split_model(path, tmp_path / "s", max_tensors=6)
    assert len(shards) > 1
    quantize_file(path, tmp_path / "whole.gguf", "Q8_0", progress=False)
    quantize_file(shards[0], tmp_path / "from-split.gguf", "Q8_0", progress=False)
    assert sha256(tmp_path / "from-split.gguf") == sha256(tmp_path / "whole.gguf")
