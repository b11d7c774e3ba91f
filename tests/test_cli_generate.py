"""``pyllm run`` and ``pyllm chat`` on the real model, the chat driven through a real terminal."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail
from tests.test_cli import run_cli

pytestmark = pytest.mark.model


def test_run_greedy_continues_the_prompt(smollm2_path: Path) -> None:
    proc = run_cli("run", "-m", str(smollm2_path), "-p", "The capital of France is", "-n", "8",
                   "--temp", "0", "--verbose", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The capital of France is")
    assert "Paris" in proc.stdout
    assert "prompt:" in proc.stderr and "tokens/s" in proc.stderr


def test_run_is_reproducible_with_a_seed(smollm2_path: Path) -> None:
    args = ("run", "-m", str(smollm2_path), "-p", "Once upon a time", "-n", "16", "--seed", "7",
            "--temp", "1.0")
    a, b = run_cli(*args, timeout=120), run_cli(*args, timeout=120)
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout


def test_run_prompt_file_and_stop(smollm2_path: Path, tmp_path: Path) -> None:
    prompt = tmp_path / "p.txt"
    prompt.write_text("1, 2, 3, 4,", encoding="utf-8")
    proc = run_cli("run", "-m", str(smollm2_path), "-f", str(prompt), "-n", "24", "--temp", "0",
                   "--stop", "7", timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.rstrip("\n")
    assert out.startswith("1, 2, 3, 4,") and "7" not in out
    assert " 5, 6," in out


@pytest.mark.parametrize("args", [
    ["--top-p", "2"],
    ["--temp", "-1"],
    ["--mirostat", "3"],
    ["-n", "-5"],
    ["-n", "-2"],
    ["--top-k", "x"],
    ["-t", "0"],
])
def test_run_bad_values_exit_2(smollm2_path: Path, args: list[str]) -> None:
    proc = run_cli("run", "-m", str(smollm2_path), "-p", "hi", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


@pytest.mark.parametrize("content", [None, b"\xff\xfe not utf-8"])
def test_run_bad_prompt_file_is_bad_input(smollm2_path: Path, tmp_path: Path,
                                          content: bytes | None) -> None:
    # the flag is well formed, the file is not: exit 1 (bad input), not 2 (bad flag)
    path = tmp_path / "prompt.txt"
    if content is not None:
        path.write_bytes(content)
    proc = run_cli("run", "-m", str(smollm2_path), "-f", str(path))
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read prompt file"), proc.stderr


def test_run_n_zero_generates_nothing(smollm2_path: Path) -> None:
    # llama.cpp's meaning: -n 0 generates no token (it used to run until the context was full)
    proc = run_cli("run", "-m", str(smollm2_path), "-p", "The capital of France is", "-n", "0",
                   "--temp", "0", "--verbose", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "The capital of France is\n"
    assert "generation: 0 tokens" in proc.stderr and "finish: length" in proc.stderr


def test_run_n_minus_one_runs_until_done(smollm2_path: Path) -> None:
    # -1: until an end-of-text token or the context is full (here the 48-token context)
    proc = run_cli("run", "-m", str(smollm2_path), "-p", "Once upon a time", "-n", "-1",
                   "-c", "48", "--temp", "0", "--verbose", timeout=120)
    assert proc.returncode == 0, proc.stderr
    n_prompt = int(proc.stderr.split("prompt: ", 1)[1].split(" tokens", 1)[0])
    n_gen = int(proc.stderr.split("generation: ", 1)[1].split(" tokens", 1)[0])
    assert "finish: length" in proc.stderr and n_prompt + n_gen == 48


@pytest.mark.parametrize("flag", ["-c", "-b", "-t", "-n"])
def test_run_huge_counts_are_flag_errors(smollm2_path: Path, flag: str) -> None:
    proc = run_cli("run", "-m", str(smollm2_path), "-p", "hi", flag, str(2**31))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: argument {flag}/"), proc.stderr


def test_run_context_too_big_for_memory(smollm2_path: Path) -> None:
    # ten million positions of SmolLM2's f16 KV cache are ~215 GiB: refused before allocating
    proc = run_cli("run", "-m", str(smollm2_path), "-p", "hi", "-c", "10000000", timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: a context of n_ctx=10000000 needs "
                                                   "215.3 GiB"), proc.stderr
    assert "of memory is available" in lines[0]


def test_run_caps_threads_and_warns_beyond_training(smollm2_path: Path) -> None:
    from pyllm.runtime.sysinfo import available_cpus

    proc = run_cli("run", "-m", str(smollm2_path), "-p", "The capital of France is", "-n", "4",
                   "--temp", "0", "-t", "1000", "-c", "8200", "--verbose", timeout=120)
    assert proc.returncode == 0, proc.stderr
    cpus = available_cpus()
    assert f"pyllm: warning: 1000 threads asked for but this process may use {cpus} CPUs; " \
        f"using {cpus}" in proc.stderr
    assert f", {cpus} threads" in proc.stderr  # what the context really got
    assert "pyllm: warning: n_ctx 8200 exceeds the 8192 positions the model was trained on" \
        in proc.stderr
    assert "Paris" in proc.stdout


def test_run_malformed_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    proc = run_cli("run", "-m", str(bad), "-p", "hi")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")


# ---- interactive chat in a real terminal -----------------------------------------------------

EXITED = "[pyllm exited with status "


class Tmux:
    """A real terminal running ``command``. When it exits the pane prints its exit status and
    stays open, so the test reads the end state whenever it gets there."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self.name = f"pyllm-{uuid.uuid4().hex[:8]}"
        env = {"PYLLM_CACHE": os.environ.get("PYLLM_CACHE", ""), **(env or {})}
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if v)
        cmd = " ".join(shlex.quote(c) for c in command)
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", "160", "-y", "50",
                        "-c", tempfile.gettempdir(),
                        f"{prefix} {cmd}; echo '{EXITED}'$?']'; exec cat"], check=True)

    def send(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-J", "-t", self.name, "-S", "-200"],
                              capture_output=True, text=True, check=True).stdout

    def wait_for(self, predicate, hang_guard: float = 300) -> str:  # type: ignore[no-untyped-def]
        """Poll the screen until ``predicate`` holds; the deadline only turns a hang into a
        failure (nothing here depends on how fast the machine is)."""
        end = time.monotonic() + hang_guard
        while time.monotonic() < end:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"hung; screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


# Tokens after which the first reply of a session is held until Ctrl-C (pyllm.runtime.generation's
# hook)
HOLD_AFTER = 12


@pytest.fixture()
def chat_session(smollm2_path: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        skip_or_fail("tmux is not installed")
    t = Tmux([sys.executable, "-m", "pyllm", "chat", "-m", str(smollm2_path), "--temp", "0",
              "-n", "400", "--system", "You are a helpful assistant."])
    try:
        t.wait_for(lambda s: s.rstrip().endswith(">"))
        yield t
    finally:
        t.close()


def _prompts(screen: str) -> int:
    return sum(1 for line in screen.splitlines() if line.startswith(">"))


def test_chat_in_terminal(chat_session: Tmux) -> None:
    t = chat_session
    t.send("What is the capital of France? Answer in one word.", "Enter")
    screen = t.wait_for(lambda s: _prompts(s) >= 2 and s.rstrip().endswith(">"))
    assert "Paris" in screen
    # a follow-up question sees the history
    t.send("And of Italy?", "Enter")
    screen = t.wait_for(lambda s: _prompts(s) >= 3 and s.rstrip().endswith(">"))
    assert "Rome" in screen
    t.send("/reset", "Enter")
    t.wait_for(lambda s: "(conversation reset)" in s)
    t.send("/exit", "Enter")
    screen = t.wait_for(lambda s: EXITED in s)
    assert f"{EXITED}0]" in screen  # pyllm chat has exited cleanly, the shell moved on


def test_chat_ctrl_c_stops_the_reply(smollm2_path: Path, tmp_path: Path) -> None:
    if shutil.which("tmux") is None:
        skip_or_fail("tmux is not installed")
    # The first reply is held after HOLD_AFTER tokens, so Ctrl-C lands mid-reply however fast
    # the machine decodes.
    t = Tmux([sys.executable, "-m", "pyllm", "chat", "-m", str(smollm2_path), "--temp", "0",
              "-n", "400"], env={"PYLLM_TEST_HOLD_AFTER": str(HOLD_AFTER),
                                 "PYLLM_TEST_HOLD_FLAG": str(tmp_path / "held")})
    try:
        t.wait_for(lambda s: s.rstrip().endswith(">"))
        question = "Write a very long story about a dragon, with many chapters."
        t.send(question, "Enter")
        # the reply is held after HOLD_AFTER tokens; its text is on the screen
        t.wait_for(lambda s: (tmp_path / "held").exists())
        before = t.wait_for(lambda s: len(s.split("chapters.", 1)[-1].strip()) > 20)
        t.send("C-c")
        screen = t.wait_for(lambda s: "[stopped]" in s and s.rstrip().endswith(">"))
        assert "Traceback" not in screen
        # (the terminal echoes the interrupt as ^C)
        reply = screen.split("chapters.", 1)[-1].split("[stopped]", 1)[0].strip()
        reply = reply.removesuffix("^C").strip()
        assert reply and reply in before  # cut where it was held: nothing after the hold
        assert _prompts(before) == 1  # the reply had not finished when Ctrl-C came
        t.send("Say hello.", "Enter")  # the session goes on (the hold is once per process)
        t.wait_for(lambda s: _prompts(s) >= 3 and s.rstrip().endswith(">"))
    finally:
        t.close()
