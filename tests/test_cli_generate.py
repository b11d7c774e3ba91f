"""``pyllm run`` and ``pyllm chat`` on the real model, the chat driven through a real terminal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    ["--top-k", "x"],
    ["-t", "0"],
])
def test_run_bad_values_exit_2(smollm2_path: Path, args: list[str]) -> None:
    proc = run_cli("run", "-m", str(smollm2_path), "-p", "hi", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


def test_run_missing_prompt_file(smollm2_path: Path) -> None:
    proc = run_cli("run", "-m", str(smollm2_path), "-f", "/nonexistent.txt")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot read prompt file")


def test_run_malformed_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    proc = run_cli("run", "-m", str(bad), "-p", "hi")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")


# ---- interactive chat in a real terminal -----------------------------------------------------

class Tmux:
    def __init__(self, command: list[str]) -> None:
        self.name = f"pyllm-{uuid.uuid4().hex[:8]}"
        env = " ".join(f"{k}={v}" for k, v in (("PYLLM_CACHE", os.environ.get("PYLLM_CACHE", "")),)
                       if v)
        cmd = " ".join(f"'{c}'" for c in command)
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", "160", "-y", "50",
                        "-c", tempfile.gettempdir(),
                        f"{env} {cmd}; sleep 30"], check=True)

    def send(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-J", "-t", self.name, "-S", "-200"],
                              capture_output=True, text=True, check=True).stdout

    def wait_for(self, predicate, timeout: float = 90) -> str:  # type: ignore[no-untyped-def]
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"timed out; screen:\n{self.screen()}")

    def current_command(self) -> str:
        return subprocess.run(["tmux", "list-panes", "-t", self.name, "-F",
                               "#{pane_current_command}"],
                              capture_output=True, text=True, check=True).stdout.strip()

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


@pytest.fixture()
def chat_session(smollm2_path: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    t = Tmux([sys.executable, "-m", "pyllm", "chat", "-m", str(smollm2_path), "--temp", "0",
              "-n", "400", "--system", "You are a helpful assistant."])
    try:
        t.wait_for(lambda s: s.rstrip().endswith(">"), timeout=60)
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
    end = time.monotonic() + 30
    while t.current_command() != "sleep" and time.monotonic() < end:
        time.sleep(0.2)
    assert t.current_command() == "sleep"  # pyllm chat has exited, the shell moved on


def test_chat_ctrl_c_stops_the_reply(chat_session: Tmux) -> None:
    t = chat_session
    t.send("Write a very long story about a dragon, with many chapters.", "Enter")
    t.wait_for(lambda s: len(s.split("chapters.", 1)[-1].strip()) > 40)
    t.send("C-c")
    screen = t.wait_for(lambda s: "[stopped]" in s and s.rstrip().endswith(">"))
    assert "Traceback" not in screen
    t.send("Say hello.", "Enter")
    t.wait_for(lambda s: _prompts(s) >= 3 and s.rstrip().endswith(">"))
