"""``pyllm bench`` (pyllm/cli/bench.py, pyllm/tools/throughput.py) on tiny models: the rows and
columns of each output format, thread counts and repetitions as given, and bad flags as usage
errors.

Nothing here checks a speed: tokens/s are only required to be numbers the format can carry.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pyllm.cli import main
from pyllm.runtime.sysinfo import available_cpus
from pyllm.tools.throughput import BenchResult
from tests.tiny_models import TinySpec, write_tiny

FIELDS = list(BenchResult.__dataclass_fields__)
MD_HEADER = ["model", "size", "params", "backend", "threads", "test", "t/s", "load s",
             "peak RSS MiB"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("bench")
    return [write_tiny(folder / "tiny-a.gguf", TinySpec()),
            write_tiny(folder / "tiny-b.gguf", TinySpec(n_layer=1, seed=1))]


def bench(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["bench", *argv]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def threads_used(asked: int) -> int:
    # LLM caps threads at the CPUs this process may use (with a warning)
    return min(asked, available_cpus())


def expected_rows(models: list[Path], threads: list[int], tests: list[str]
                  ) -> list[tuple[str, int, str]]:
    """(model file name, threads, test) in the order bench runs them."""
    return [(m.name, threads_used(t), test) for m in models for t in threads for test in tests]


@pytest.mark.parametrize("thread_flags", [["-t", "1", "2"], ["-t", "1", "-t", "2"]])
def test_json(capsys: pytest.CaptureFixture[str], models: list[Path],
              thread_flags: list[str]) -> None:
    """Both spellings of several thread counts: the README's `-t 1 2` and a repeated -t."""
    out = bench(capsys, "-m", str(models[0]), "-p", "8", "-n", "3", "-r", "3", *thread_flags,
                "-o", "json")
    rows = json.loads(out)
    assert [(r["model"], r["threads"], r["test"]) for r in rows] == \
        expected_rows(models[:1], [1, 2], ["pp8", "tg3"])
    size = os.path.getsize(models[0])
    for r in rows:
        assert list(r) == FIELDS
        assert r["reps"] == 3
        assert 0 < r["size_bytes"] < size  # the tensors, without the file's header
        assert r["n_params"] > 0 and r["load_s"] > 0 and r["peak_rss_mib"] > 0
        assert r["tokens_per_s"] > 0 and r["stdev"] >= 0


def test_csv_two_models(capsys: pytest.CaptureFixture[str], models: list[Path]) -> None:
    out = bench(capsys, "-m", str(models[0]), str(models[1]), "-p", "4", "-n", "2", "-r", "1",
                "-t", "1", "2", "-o", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == FIELDS
    assert [(r["model"], int(r["threads"]), r["test"]) for r in rows] == \
        expected_rows(models, [1, 2], ["pp4", "tg2"])
    for r in rows:
        assert int(r["reps"]) == 1
        assert float(r["stdev"]) == 0.0  # one repetition has no spread
        assert float(r["tokens_per_s"]) > 0
    # the two models differ in size (one layer fewer), and each row says which it is
    sizes = {r["model"]: int(r["size_bytes"]) for r in rows}
    assert sizes["tiny-b.gguf"] < sizes["tiny-a.gguf"]


def test_markdown(capsys: pytest.CaptureFixture[str], models: list[Path]) -> None:
    out = bench(capsys, "-m", str(models[0]), "-p", "0", "-n", "2", "-r", "2", "-t", "2", "1")
    lines = out.strip().splitlines()
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    assert cells[0] == MD_HEADER
    assert all(set(c) <= set("-: ") for c in cells[1]) and len(cells[1]) == len(MD_HEADER)
    body = cells[2:]
    # -p 0 skips prompt processing; thread counts run in the order given
    assert [(c[0], int(c[4]), c[5]) for c in body] == \
        expected_rows(models[:1], [2, 1], ["tg2"])
    assert {c[3] for c in body} == {"cpu"}  # every layer on the CPU
    for c in body:
        assert len(c) == len(MD_HEADER)
        mean, stdev = c[6].split(" ± ")
        assert float(mean) > 0 and float(stdev) >= 0
        assert c[1].endswith(" MiB") and c[2].endswith(" M")


@pytest.mark.parametrize("argv", [["-t", "0"], ["-t", "x"], ["-t"], ["-r", "0"], ["-o", "xml"],
                                  ["-p", "-1"], ["-p", "0", "-n", "0"], ["-n", "lots"],
                                  ["--bogus"], ["-m"], ["-p", str(2**31)], ["-n", str(2**31)],
                                  ["-t", str(2**31)]])
def test_bad_flags_exit_2(capsys: pytest.CaptureFixture[str], models: list[Path],
                          argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "-m", str(models[0]), *argv])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err


def test_missing_model_is_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["bench", "-m", str(tmp_path / "nope.gguf"), "-p", "4", "-n", "0"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "nope.gguf" in err


def test_readme_command_line(models: list[Path]) -> None:
    """The installed entry point, as the README writes it: `pyllm bench ... -t 1 2`."""
    proc = subprocess.run([sys.executable, "-m", "pyllm.cli", "bench", "-m", str(models[1]),
                           "-p", "4", "-n", "2", "-r", "1", "-t", "1", "2", "-o", "json"],
                          capture_output=True, text=True, timeout=120,
                          cwd=tempfile.gettempdir())  # not the checkout: see tests/test_cli.py
    assert proc.returncode == 0, proc.stderr
    assert [r["threads"] for r in json.loads(proc.stdout)] == \
        [threads_used(1)] * 2 + [threads_used(2)] * 2
