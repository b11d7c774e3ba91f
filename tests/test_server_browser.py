"""The chat page of ``pyllm serve`` in a real headless Chromium (Selenium + the system browser).

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium
chromium-driver``); skipped when they or selenium are missing. Sends a message and watches the
text stream in, changes knobs (system prompt, temperature, max tokens) and checks the reply is
the greedy one for exactly those settings, stops a long generation and checks the server freed
the slot. A screenshot is kept in tests/artifacts/ (or $PYLLM_ARTIFACTS).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from pyllm.model import LLM  # noqa: E402
from pyllm.server.app import ServerConfig, create_app  # noqa: E402
from pyllm.server.engine import Engine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BROWSER = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
DRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(BROWSER is None or DRIVER is None,
                       reason="needs Debian's chromium and chromium-driver "
                              "(apt-get install -y chromium chromium-driver)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def llm(smollm2_path: Path) -> Iterator[LLM]:
    with LLM(smollm2_path, n_ctx=256) as model:
        yield model


@pytest.fixture(scope="module")
def engine(llm: LLM) -> Iterator[Engine]:
    eng = Engine(llm, n_parallel=2, n_ctx=512)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def base_url(engine: Engine) -> Iterator[str]:
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ServerConfig(model_id="smollm2-test"),
                                                      engine=engine),
                                           host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = BROWSER
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,800", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _set(driver: Any, element_id: str, value: str) -> None:
    el = driver.find_element(By.ID, element_id)
    if el.tag_name == "select":
        driver.execute_script("arguments[0].value = arguments[1];"
                              "arguments[0].dispatchEvent(new Event('change'));", el, value)
        return
    el.clear()
    el.send_keys(value)


def _last_assistant(driver: Any) -> Any:
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]


def _wait_idle(engine: Engine, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while engine.active or engine.queue_depth:
        assert time.monotonic() < deadline, "the server did not free the slot"
        time.sleep(0.02)


def test_chat_page_streams_uses_knobs_and_stops(browser: Any, base_url: str, llm: LLM,
                                                engine: Engine) -> None:
    d = browser
    d.get(base_url + "/")
    wait = WebDriverWait(d, 60, poll_frequency=0.02)
    wait.until(lambda drv: "smollm2-test" in drv.find_element(By.ID, "model").text)
    # every knob the issue lists is on the page
    for knob in ("system", "temperature", "top_k", "top_p", "min_p", "typical_p", "tfs_z",
                 "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty",
                 "mirostat", "mirostat_tau", "mirostat_eta", "seed", "max_tokens",
                 "stop_strings", "stop", "send"):
        assert d.find_element(By.ID, knob).is_displayed(), knob

    # 1. change knobs, send a message, watch the reply stream in
    system, question = "You are a concise assistant.", "What is the capital of France?"
    _set(d, "system", system)
    _set(d, "temperature", "0")
    _set(d, "max_tokens", "24")
    _set(d, "mirostat", "0")
    expected = llm.chat([{"role": "system", "content": system},
                         {"role": "user", "content": question}], max_tokens=24, temperature=0)
    _set(d, "input", question)
    d.find_element(By.ID, "send").click()
    # text visible while the bubble is still marked as streaming (read in one atomic call)
    partial = wait.until(lambda drv: drv.execute_script(
        "const b = document.querySelector('.msg.assistant.streaming');"
        "return b && b.querySelector('.content').textContent || null;"))
    wait.until(lambda drv: _last_assistant(drv).get_attribute("data-finish"))
    bubble = _last_assistant(d)
    final = bubble.find_element(By.CLASS_NAME, "content").text
    assert final.startswith(partial.strip()) and len(final) > len(partial.strip())
    # the reply is the greedy one for these knobs: temperature, max_tokens, system prompt
    assert final == expected.strip()
    assert bubble.get_attribute("data-finish") in ("stop", "length")
    assert "tokens/s" in d.find_element(By.ID, "status").text

    # 2. a long generation, stopped from the page: the server frees the slot
    cancelled = engine.stats.finished["cancelled"]
    _set(d, "max_tokens", "400")
    _set(d, "input", "Write a very long story about a dragon.")
    d.find_element(By.ID, "send").click()
    wait.until(lambda drv: len(drv.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
               and _last_assistant(drv).find_element(By.CLASS_NAME, "content").text)
    assert d.find_element(By.ID, "stop").is_enabled()
    d.find_element(By.ID, "stop").click()
    wait.until(lambda drv: _last_assistant(drv).get_attribute("data-finish") == "stopped")
    _wait_idle(engine, 10)
    assert engine.stats.finished["cancelled"] == cancelled + 1
    assert d.find_element(By.ID, "send").is_enabled()

    out = Path(os.environ.get("PYLLM_ARTIFACTS", ROOT / "tests" / "artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        (out / "server_chat_page.png").unlink()
    assert d.save_screenshot(str(out / "server_chat_page.png"))
    assert (out / "server_chat_page.png").stat().st_size > 10_000


def test_chat_page_with_api_key(browser: Any, engine: Engine) -> None:
    """On a server with --api-key the page is opened with ?api_key=KEY and works with it; a
    wrong key typed into the page is reported."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(
        create_app(ServerConfig(model_id="keyed", api_key="k3y"), engine=engine),
        host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        d = browser
        d.get(f"http://127.0.0.1:{port}/?api_key=k3y")
        wait = WebDriverWait(d, 60, poll_frequency=0.05)
        wait.until(lambda drv: "keyed" in drv.find_element(By.ID, "model").text)
        assert "api_key" not in d.current_url  # taken out of the address bar
        _set(d, "api_key", "wrong")
        d.find_element(By.ID, "input").click()  # leaving the field fires 'change'
        wait.until(lambda drv: "API key needed" in drv.find_element(By.ID, "model").text)
        _set(d, "api_key", "k3y")
        d.find_element(By.ID, "input").click()
        wait.until(lambda drv: "keyed" in drv.find_element(By.ID, "model").text)
        _set(d, "max_tokens", "4")
        _set(d, "input", "Hello")
        d.find_element(By.ID, "send").click()
        wait.until(lambda drv: drv.find_elements(By.CSS_SELECTOR, ".msg.assistant")
                   and _last_assistant(drv).get_attribute("data-finish"))
        assert _last_assistant(d).get_attribute("data-finish") in ("stop", "length")
        assert not d.find_elements(By.CSS_SELECTOR, ".msg.error")
    finally:
        server.should_exit = True
        thread.join(10)
