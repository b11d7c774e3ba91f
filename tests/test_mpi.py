"""The layer pipeline over MPI (pyllm/runtime/mpi.py): ``mpirun -np 2`` and ``-np 3`` (OpenMPI,
``--oversubscribe`` on a 2-core machine) give the logits, greedy tokens, saved states and text
of one process, bit for bit; perplexity is equal; a killed rank ends the job naming it; ranks
that see another model file, run another pyllm, cannot open the file or run out of memory are
refused with one error naming the rank; the server drains on SIGTERM and every rank exits.
The pieces without MPI: the split of the layers, one process's share of placement and tensors,
and a chain of ``decode_part`` calls in one process (with a control that skips a share).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from pyllm.errors import PipelineError
from pyllm.runtime.loaded import LoadedModel, shard_placement, shard_tensors
from pyllm.runtime.mpi_wire import parse_layer_split, split_layers
from tests.conftest import HANG_GUARD, skip_or_fail
from tests.tiny_models import TinySpec, write_tiny

SCRIPT = Path(__file__).with_name("mpi_pipeline_run.py")
RUN_GUARD = 180.0  # a hang guard for one mpirun, not a timing


def _mpirun() -> list[str]:
    exe = shutil.which("mpirun")
    if exe is None or importlib.util.find_spec("mpi4py") is None:
        skip_or_fail("the MPI tests need OpenMPI's mpirun and mpi4py (pip install 'pyllm[mpi]')")
    assert exe is not None
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return [exe, *root, "--oversubscribe"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYLLM_FORCE_ISA", None)
    env.update(extra)
    return env


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_GUARD,
                          cwd=kw.pop("cwd", tempfile.gettempdir()), env=kw.pop("env", _env()),
                          **kw)


def _pyllm(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyllm", *args]


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# ---- one process against the pipeline --------------------------------------------------------


def _script(model: Path, out: Path, *extra: str, np_: int = 0) -> dict[str, np.ndarray]:
    cmd = [sys.executable, str(SCRIPT), str(model), str(out), *extra]
    if np_:
        cmd = [*_mpirun(), "-np", str(np_), *cmd]
    r = _run(cmd)
    assert r.returncode == 0, r.stdout + r.stderr
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-layer model (Q8_0 matrices, untied output)."""
    from pyllm.formats.gguf import GGMLType

    return write_tiny(tmp_path_factory.mktemp("mpi") / "tiny4.gguf",
                      TinySpec(n_layer=4, n_embd=64, n_ff=128, wtype=GGMLType.Q8_0, seed=3))


CASES = [("smollm2", 2, None), ("smollm2", 3, None), ("tiny4", 3, "1,2,1")]


@pytest.mark.parametrize(("model", "ranks", "split"), CASES)
def test_pipeline_equals_one_process(model: str, ranks: int, split: str | None,
                                     request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Logits of a prompt run as 4 chunks (pipelined), 12 greedy tokens, the saved state's
    bytes, the logits after loading it back and after a context shift, and greedy text: the
    same bits as one process (same thread count, same chunks); embeddings refused."""
    _mpirun()
    path = request.getfixturevalue("smollm2_path" if model == "smollm2" else "tiny4")
    extra = ["--split", split] if split else []
    if model == "smollm2":
        extra += ["--text", "The capital of France is"]
    ref = _script(path, tmp_path / "one.npz", *extra)
    got = _script(path, tmp_path / "pipe.npz", *extra, np_=ranks)
    assert int(got["ranks"]) == ranks and int(ref["ranks"]) == 1
    for key in ("logits", "greedy", "state", "after_state", "after_load", "after_shift"):
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    np.testing.assert_array_equal(got["after_load"], got["after_state"])
    assert float(np.abs(got["after_shift"] - got["after_state"]).max()) > 1e-3  # it moved
    if model == "smollm2":
        assert str(got["text"]) == str(ref["text"]) and str(ref["text"]).strip()
    assert str(ref["embed_error"]) == ""
    assert "not in an MPI pipeline" in str(got["embed_error"])
    assert len(got["rss"]) == ranks and all(int(x) > 0 for x in got["rss"])


def test_cli_run_and_perplexity_equal_one_process(smollm2_path: Path, tmp_path: Path) -> None:
    """`pyllm run --temp 0` prints the same text; `pyllm perplexity` the same estimate (its
    chunks of 32 tokens pipelined over 3 ranks)."""
    mpirun = _mpirun()
    run = ["run", "-m", str(smollm2_path), "-p", "The three primary colours are", "-n", "20",
           "--temp", "0", "-t", "1"]
    one = _run(_pyllm(*run))
    two = _run([*mpirun, "-np", "2", *_pyllm(*run, "--mpi", "--layer-split", "20,10")])
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert two.stdout == one.stdout and len(one.stdout) > 40
    text = tmp_path / "text.txt"
    text.write_text((Path(__file__).parents[1] / "README.md").read_text()[:4000])
    ppl = ["perplexity", "-m", str(smollm2_path), "-f", str(text), "-c", "128", "-b", "32",
           "-t", "1"]
    one = _run(_pyllm(*ppl))
    three = _run([*mpirun, "-np", "3", *_pyllm(*ppl, "--mpi")])
    assert one.returncode == 0 and three.returncode == 0, one.stderr + three.stderr

    def estimate(out: str) -> str:
        m = re.search(r"PPL = \S+ \+/- \S+ \(\d+ tokens", out)
        assert m, out
        return m.group(0)

    assert estimate(three.stdout) == estimate(one.stdout)


# ---- faults ----------------------------------------------------------------------------------


def _rank_pid(mark: str, rank: int) -> int | None:
    """The pid of the process of this test's job (environment mark) with that MPI rank."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PYLLM_TEST_MARK={mark}".encode() in env and \
                f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            return int(proc.name)
    return None


class _Server:
    """`pyllm serve --port 0` (under mpirun when given): its port, then SIGTERM to rank 0."""

    def __init__(self, model: Path, mpirun: list[str] | None) -> None:
        self.mark = uuid.uuid4().hex
        args = _pyllm("serve", "-m", str(model), "--port", "0", "-t", "1", "--parallel", "4",
                      "-c", "512")
        cmd = [*mpirun, "-np", "2", *args, "--mpi"] if mpirun else args
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=tempfile.gettempdir(),
                                     env=_env(PYLLM_TEST_MARK=self.mark))
        self.lines: list[str] = []
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := re.search(r"listening on (http://127\.0\.0\.1:\d+)", line):
                self.url = m.group(1)
            if "pyllm: serving" in line:
                break
        assert hasattr(self, "url"), "".join(self.lines)

    def complete(self, prompt: str, max_tokens: int = 24) -> str:
        r = httpx.post(f"{self.url}/v1/completions", timeout=HANG_GUARD,
                       json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["text"])

    def four(self) -> list[str]:
        prompts = [f"Write the number {k} in words:" for k in range(4)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            return list(pool.map(self.complete, prompts))

    def cancel_a_stream(self) -> None:
        """Start a long streamed completion and drop the connection after a few chunks."""
        body = {"prompt": "Tell me a long story.", "max_tokens": 400, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", f"{self.url}/v1/completions", json=body,
                          timeout=HANG_GUARD) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 6:
                    break

    def stop(self) -> tuple[int, str]:
        pid = _rank_pid(self.mark, 0) if self.proc.args[0] != sys.executable else self.proc.pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        rc = self.proc.wait(HANG_GUARD)
        assert self.proc.stdout is not None
        return rc, "".join(self.lines) + self.proc.stdout.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_a_killed_rank_ends_the_job(smollm2_path: Path) -> None:
    """SIGKILL to rank 1 of a serving job: every rank is gone within seconds (mpirun ends
    them) and the job's output names rank 1 and the signal; no hang."""
    server = _Server(smollm2_path, _mpirun())
    try:
        assert server.complete("Hello", 4)  # rank 0 answers through rank 1
        pid = _rank_pid(server.mark, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        rc = server.proc.wait(HANG_GUARD)
        assert server.proc.stdout is not None
        out = "".join(server.lines) + server.proc.stdout.read()
    finally:
        server.kill()
    assert rc != 0
    assert re.search(r"rank 1 .*signal 9", out), out
    assert _rank_pid(server.mark, 0) is None and _rank_pid(server.mark, 1) is None


def test_a_rank_failing_in_a_forward_ends_the_job(smollm2_path: Path, tmp_path: Path) -> None:
    """A worker whose forward raises reports to rank 0, which prints one error line naming the
    rank and the cause and ends every rank (MPI_Abort): no hang."""
    cmd = [*_mpirun(), "-np", "3", sys.executable, str(SCRIPT), str(smollm2_path),
           str(tmp_path / "never.npz"), "--fail-in-forward"]
    r = _run(cmd)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and not (tmp_path / "never.npz").exists()
    assert _error_lines(out) == ["error: rank 1: injected failure in a forward"], out


@pytest.fixture(scope="module")
def folders(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Working folders whose model.gguf is SmolLM2, a copy with another name in its header, or
    missing: mpirun starts each rank in its own (--wdir), as on separate machines."""
    root = tmp_path_factory.mktemp("ranks")
    same, other, empty = root / "same", root / "other", root / "empty"
    for d in (same, other, empty):
        d.mkdir()
    (same / "model.gguf").symlink_to(smollm2_path)
    data = bytearray(smollm2_path.read_bytes())
    at = data.index(b"general.name") + len(b"general.name") + 4 + 8  # key, type, length
    data[at] ^= 0x20  # one letter's case: the same tensors, another header
    (other / "model.gguf").write_bytes(bytes(data))
    return {"same": same, "other": other, "empty": empty}


def _mpmd(rank0: list[str], rank1: list[str], wdir0: Path, wdir1: Path
          ) -> subprocess.CompletedProcess[str]:
    """Rank 0 and rank 1 as two app contexts of one job (each with its folder)."""
    return _run([*_mpirun(), "-np", "1", "--wdir", str(wdir0), *rank0, ":",
                 "-np", "1", "--wdir", str(wdir1), *rank1])


RUN_ARGS = ["run", "-m", "model.gguf", "-p", "hi", "-n", "2", "-t", "1", "--mpi"]


@pytest.mark.parametrize(("case", "expected"), [
    ("other_file", r"^error: rank 1: sees another model file at model\.gguf than rank 0"),
    ("missing_file", r"^error: rank 1: model\.gguf: cannot open: No such file"),
    ("other_version", r"^error: rank 1: runs pyllm 0\.0\.1, rank 0 runs \S+: install the same"),
    ("out_of_memory", r"^error: rank 1: out of memory allocating a context of n_ctx=131072$"),
])
def test_a_rank_that_cannot_join_is_named(case: str, expected: str,
                                          folders: dict[str, Path]) -> None:
    """One `error:` line on rank 0 naming the rank and the cause; the job ends (exit 1)."""
    rank0 = _pyllm(*RUN_ARGS)
    rank1, wdir1 = _pyllm(*RUN_ARGS), folders["same"]
    if case == "other_file":
        wdir1 = folders["other"]
    elif case == "missing_file":
        wdir1 = folders["empty"]
    elif case == "other_version":
        rank1 = [sys.executable, "-c", "import sys, pyllm; pyllm.__version__ = '0.0.1'; "
                 "from pyllm.cli import main; sys.exit(main(sys.argv[1:]))", *RUN_ARGS]
    else:
        # rank 1 may map its layers (about 600 MB of address space with Python and MPI) but
        # not its share of a 131072-position K/V cache (over 1 GB)
        rank0 = _pyllm(*RUN_ARGS, "-c", "131072")
        rank1 = ["bash", "-c", "ulimit -v 1200000 && exec \"$@\"", "rank1",
                 *_pyllm(*RUN_ARGS, "-c", "131072")]
    r = _mpmd(rank0, rank1, folders["same"], wdir1)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    errors = _error_lines(out)
    assert len(errors) == 1 and re.search(expected, errors[0]), out
    assert "Traceback" not in out


def test_the_same_file_in_each_folder_joins(folders: dict[str, Path]) -> None:
    """The control of the refusals above: the same file under each rank's folder runs."""
    r = _mpmd(_pyllm(*RUN_ARGS), _pyllm(*RUN_ARGS), folders["same"], folders["same"])
    assert r.returncode == 0 and not _error_lines(r.stdout + r.stderr), r.stdout + r.stderr


def test_layer_split_flags(smollm2_path: Path) -> None:
    """--layer-split is checked: without --mpi and malformed (usage errors, exit 2), a split
    that does not add up to the model (one error line; the workers exit, no hang)."""
    base = ["run", "-m", str(smollm2_path), "-p", "hi", "-n", "2", "-t", "1"]
    r = _run(_pyllm(*base, "--layer-split", "15,15"))
    assert r.returncode == 2 and "--layer-split needs --mpi" in r.stderr
    r = _run(_pyllm(*base, "--mpi", "--layer-split", "15,0"))
    assert r.returncode == 2 and "every rank needs at least one layer" in r.stderr
    r = _run([*_mpirun(), "-np", "2", *_pyllm(*base, "--mpi", "--layer-split", "10,10")])
    errors = _error_lines(r.stdout + r.stderr)
    assert r.returncode != 0 and errors == [
        "error: --layer-split gives 2 ranks 20 layers; this job has 2 ranks and the model 30 "
        "layers"], r.stdout + r.stderr


# ---- the server --------------------------------------------------------------------------------


def test_server_behind_mpi(smollm2_path: Path) -> None:
    """`mpirun -np 2 pyllm serve --mpi`: four concurrent greedy completions give one process's
    server's texts; a cancelled stream frees its slot on every rank (the same four again give
    the same texts: a rank whose cache kept the cancelled positions would not); SIGTERM to
    rank 0 drains, the worker exits, mpirun exits 0."""
    mpirun = _mpirun()
    one = _Server(smollm2_path, None)
    try:
        ref = one.four()
    finally:
        one.kill()
    two = _Server(smollm2_path, mpirun)
    try:
        assert two.four() == ref
        two.cancel_a_stream()
        assert two.four() == ref
        rc, out = two.stop()
    finally:
        two.kill()
    assert rc == 0, out
    assert "error" not in out.lower() and "Traceback" not in out, out
    assert _rank_pid(two.mark, 1) is None
    assert all(t.strip() for t in ref) and len(set(ref)) > 1


# ---- the pieces, in one process ----------------------------------------------------------------


def test_split_layers() -> None:
    """Balanced by bytes (the head counted on the last rank), or by --layer-split counts."""
    assert split_layers([10] * 30, 0, 3) == [(0, 10), (10, 20), (20, 30)]
    # a head as large as 5 layers: the last rank takes fewer layers
    ranges = split_layers([10] * 30, 50, 3)
    shares = [10 * (b - a) + (50 if b == 30 else 0) for a, b in ranges]
    assert ranges[-1][1] - ranges[-1][0] < 10 and max(shares) - min(shares) <= 10, ranges
    assert split_layers([1, 1, 100, 1], 0, 2) == [(0, 2), (2, 4)]
    assert split_layers([5] * 4, 0, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert split_layers([5] * 30, 0, 3, [10, 12, 8]) == [(0, 10), (10, 22), (22, 30)]
    with pytest.raises(PipelineError, match="every rank needs at least one layer"):
        split_layers([5] * 2, 0, 3)
    with pytest.raises(PipelineError, match="gives 2 ranks 20 layers; this job has 3 ranks"):
        split_layers([5] * 30, 0, 3, [10, 10])
    assert parse_layer_split("10,12,10") == [10, 12, 10]
    for bad in ("", "10,,2", "a", "3,0"):
        with pytest.raises(PipelineError):
            parse_layer_split(bad)


def test_shard_placement() -> None:
    """One rank's placement: its range of the whole placement, remote ranges around it, the
    head (with an empty head range of its own, as -ngl makes) only on the last rank."""
    assert shard_placement([], 30, (0, 10)) == [("cpu", 0, 10), ("remote", 10, 30)]
    assert shard_placement([], 30, (10, 20)) == [("remote", 0, 10), ("cpu", 10, 20),
                                                 ("remote", 20, 30)]
    assert shard_placement([], 30, (20, 30)) == [("remote", 0, 20), ("cpu", 20, 30)]
    gpu = [("cpu", 0, 18), ("opencl:0", 18, 30), ("cpu", 30, 30)]  # -ngl 12
    assert shard_placement(gpu, 30, (10, 20)) == [("remote", 0, 10), ("cpu", 10, 18),
                                                  ("opencl:0", 18, 20), ("remote", 20, 30)]
    assert shard_placement(gpu, 30, (20, 30)) == [("remote", 0, 20), ("opencl:0", 20, 30),
                                                  ("cpu", 30, 30)]
    with pytest.raises(Exception, match="layer_range"):
        shard_placement([], 30, (5, 5))


def test_remote_ranges_are_checked(smollm2_path: Path) -> None:
    """Only the first and the last range may be remote, and one range must be local."""
    from pyllm.errors import ModelError

    for placement, message in (
            ([("cpu", 0, 10), ("remote", 10, 20), ("cpu", 20, 30)],
             "only the first and the last range may be remote"),
            ([("remote", 0, 30)], "a placement needs one range on this process")):
        with pytest.raises(ModelError, match=message):
            LoadedModel(smollm2_path, placement=placement)


def test_decode_part_chain_in_one_process(smollm2_path: Path) -> None:
    """Three shares of SmolLM2 chained by hand (what the ranks do) give the whole model's
    logits exactly; a chain that skips the middle share does not (control). Each share holds
    only its tensors, and the whole-model calls are refused on a share."""
    full = LoadedModel(smollm2_path, n_threads=1)
    n_layer = full.hparams.n_layer
    shares = [LoadedModel(smollm2_path, n_threads=1, layer_range=r)
              for r in ((0, 10), (10, 20), (20, n_layer))]
    toks = np.array(full.tokenizer.encode("The capital of France is"), dtype=np.int32)
    seq = np.zeros(len(toks), dtype=np.int32)
    want = np.ones(len(toks), dtype=np.uint8)
    ref = full.new_context(64, n_batch=4).decode_batch(toks, seq, want)
    ctxs = [m.new_context(64, n_batch=4) for m in shares]
    hidden = ctxs[0].decode_part(toks, None, seq, want)
    assert hidden.shape == (len(toks), full.n_embd)
    logits = ctxs[2].decode_part(None, ctxs[1].decode_part(None, hidden, seq, want), seq, want)
    np.testing.assert_array_equal(logits, ref)
    skipped = shares[2].new_context(64, n_batch=4).decode_part(None, hidden, seq, want)
    assert float(np.abs(skipped - ref).max()) > 1.0
    assert [c.embeds_tokens for c in ctxs] == [True, False, False]
    assert [c.has_head for c in ctxs] == [False, False, True]
    with pytest.raises(ValueError, match="use decode_part"):
        ctxs[0].decode_batch(toks, seq, want)
    with pytest.raises(ValueError, match="give their hidden rows, not tokens"):
        ctxs[1].decode_part(toks, None, seq, want)
    tensors = shard_tensors(_tensors(full), n_layer, (10, 20))
    assert not tensors.model.keys() - {"rope_freqs"}  # no embeddings, no head
    assert [bool(layer) for layer in tensors.layers] == [10 <= i < 20 for i in range(n_layer)]
    with pytest.raises(IndexError):
        ctxs[1].check_batch(None, np.zeros(65, dtype=np.int32))  # 65 positions > n_ctx 64


def _tensors(model: LoadedModel) -> Any:
    from pyllm.formats.arch import collect_tensors

    return collect_tensors(model._reader, model.hparams)  # noqa: SLF001 - the model's own file


def test_without_mpi4py_the_error_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyllm.runtime.mpi as mpi

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # an import of it fails
    with pytest.raises(PipelineError, match=r'pip install "pyllm\[mpi\]"'):
        mpi.Pipeline()
