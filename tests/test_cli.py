"""The pyllm command line: help, info on the real model, one-line errors for bad input."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import pytest

import pyllm
from pyllm.cli import build_parser, main
from tests.test_gguf import MALFORMED


def run_cli(*args: str, env: dict[str, str] | None = None, limit_as: int | None = None,
            timeout: float = 60, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    def limits() -> None:
        if limit_as:
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))

    # cwd outside the checkout: `python -m` puts cwd first on sys.path, and the source tree has
    # no compiled extension unless it is an editable install
    return subprocess.run([sys.executable, "-m", "pyllm", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})},
                          preexec_fn=limits, cwd=tempfile.gettempdir(), input=stdin)


def test_version_importable() -> None:
    assert pyllm.__version__ and pyllm.__version__[0].isdigit()


def test_help_lists_subcommands() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("info", "pull"):
        assert cmd in proc.stdout


def test_console_script_installed() -> None:
    proc = subprocess.run(["pyllm", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"pyllm {pyllm.__version__}"


def test_info_real_model(smollm2_path: Path) -> None:
    proc = run_cli("info", str(smollm2_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "architecture:  llama" in out
    assert "blocks:        30" in out
    assert "tensors:       272" in out
    assert "F32 x61" in out and "Q4_1 x210" in out and "Q8_0 x1" in out
    assert "chat template: yes" in out
    assert "token_embd.weight" in out and "blk.29.ffn_down.weight" in out


def test_info_json(smollm2_path: Path) -> None:
    proc = run_cli("info", "--json", "-m", str(smollm2_path))
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["architecture"] == "llama" and s["block_count"] == 30 and s["n_tensors"] == 272
    assert set(s["tensor_types"]) == {"F32", "Q4_1", "Q8_0"}
    assert s["tokenizer"]["model"] == "gpt2" and s["tokenizer"]["n_tokens"] == 49152
    assert s["hyperparameters"]["attention.head_count_kv"] == 3
    assert s["hyperparameters"]["attention.layer_norm_rms_epsilon"] == 1e-5
    assert len(s["tensors"]) == 272
    assert s["metadata"]["tokenizer.ggml.tokens"] == {"array": "string", "length": 49152}


def test_info_default_model_uses_cache(smollm2_path: Path) -> None:
    env = {"PYLLM_CACHE": str(smollm2_path.parent)}
    proc = run_cli("info", "--no-tensors", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "blocks:        30" in proc.stdout
    assert "downloading" not in proc.stderr  # warm cache: no download


@pytest.mark.parametrize("args", [
    ["--bogus"],
    ["info", "--bogus"],
    ["nosuchcommand"],
    ["info", "a.gguf", "-m", "b.gguf"],
])
def test_bad_flags_exit_2_with_one_line(args: list[str]) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


def test_missing_file_one_line() -> None:
    proc = run_cli("info", "/nonexistent/model.gguf")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: /nonexistent/model.gguf: cannot open: No such file or directory"]


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_info_in_process(tmp_path: Path, name: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(MALFORMED[name])
    build_parser()  # import every subcommand first: module imports are not the file's doing
    tracemalloc.start()
    try:
        rc = main(["info", str(path)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("error: ") and "internal error" not in err[0]
    # nothing the header claims may cause an allocation beyond the (tiny) file
    assert peak < 1 << 20, f"peak allocation {peak} bytes for a {len(MALFORMED[name])}-byte file"


@pytest.mark.parametrize("name", ["string-length-past-eof", "array-length-past-eof",
                                  "tensor-count-too-large", "element-count-overflow",
                                  "truncated-data"])
def test_malformed_info_subprocess_no_signal(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(MALFORMED[name])
    proc = run_cli("info", str(path), limit_as=2 << 30, timeout=60)
    assert proc.returncode in (1, 2), (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


@pytest.mark.parametrize("command", ["run", "chat"])
def test_sampling_flags_are_checked_once(smollm2_path: Path, command: str,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The flags become one SamplingParams (the one check), handed on to the generation as it
    is: no second build from keyword arguments."""
    from pyllm.runtime.sampling import SamplingParams

    built: list[SamplingParams] = []
    post_init = SamplingParams.__post_init__

    def counting(self: SamplingParams) -> None:
        post_init(self)
        built.append(self)

    monkeypatch.setattr(SamplingParams, "__post_init__", counting)
    lines = iter(["Hi"])

    def fake_input(prompt: str = "") -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    args = ["-p", "Hello"] if command == "run" else []
    rc = main([command, "-m", str(smollm2_path), "-c", "256", "-n", "3", "--temp", "0",
               "--top-k", "7", "--mirostat-ent", "4.5", *args])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert len(built) == 1, built
    assert (built[0].temperature, built[0].top_k, built[0].mirostat_tau) == (0.0, 7, 4.5)
