"""The chat page of ``pyllm serve`` in a real headless Chromium (Selenium + the system browser).

Needs selenium and Debian's ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium
chromium-driver``). Without them the tests are skipped on a developer's machine but FAIL under CI
(``CI`` set to true, as CI services and ``.ci/run`` do), so a broken browser install cannot
silently turn them off. Sends a message and watches the text stream in, changes knobs (system
prompt, temperature, max tokens) and checks the reply is the greedy one for exactly those
settings, stops a long generation and checks the server freed the slot. The sampling fields
show the server's defaults from ``GET /props`` (the page has no numbers of its own), and a
failed ``/props`` is reported on the page. The engine's scheduler
is held between steps (``Engine.pause`` / ``resume``) where the page must see a reply still
streaming, so no outcome depends on how fast the machine decodes. A screenshot is written to
$PYLLM_ARTIFACTS when that is set.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from pyllm.errors import ModelError
from pyllm.runtime.llm import LLM
from pyllm.runtime.sampling import DEFAULTS
from pyllm.server.app import STATIC_DIR, ServerConfig, create_app
from pyllm.server.engine import Engine
from tests.conftest import HANG_GUARD, serve, skip_or_fail, wait_until

try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # reported by the browser fixture: skip locally, fail under CI
    webdriver = None

BROWSER = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.model

# the page's sampling fields (element id = request field = /props params name)
KNOBS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "tfs_z", "repeat_penalty",
         "repeat_last_n", "presence_penalty", "frequency_penalty", "mirostat", "mirostat_tau",
         "mirostat_eta", "seed", "max_tokens")


def _missing() -> str | None:
    """What this test needs and does not have, or None."""
    missing = [name for name, ok in (("selenium", webdriver is not None),
                                     ("chromium", BROWSER is not None),
                                     ("chromedriver", DRIVER is not None)) if not ok]
    if not missing:
        return None
    return (f"needs {', '.join(missing)} (pip install selenium; apt-get install -y chromium "
            f"chromium-driver)")


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
    with serve(create_app(ServerConfig(model_id="smollm2-test"), engine=engine)) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = _missing()
    if missing is not None:
        skip_or_fail(f"the browser test {missing}")
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


def _wait_idle(engine: Engine) -> None:
    wait_until(lambda: not engine.active and not engine.queue_depth, "the slot to be freed")


def _knob_values(driver: Any) -> dict[str, tuple[str, bool]]:
    """Each sampling field's (value, enabled), read in one call."""
    got: dict[str, list[Any]] = driver.execute_script(
        "const out = {};"
        "for (const id of arguments[0]) {"
        "  const el = document.getElementById(id); out[id] = [el.value, !el.disabled]; }"
        "return out;", list(KNOBS))
    return {k: (v[0], v[1]) for k, v in got.items()}


def _assert_shows(driver: Any, expected: dict[str, float]) -> None:
    """The sampling fields are enabled and show exactly these numbers."""
    for knob, (value, enabled) in _knob_values(driver).items():
        assert enabled, knob
        assert value != "" and float(value) == expected[knob], (knob, value, expected[knob])


class _ValueAttributes(HTMLParser):
    """(tag, id) of every element of index.html that sets a value or a selected option."""

    def __init__(self) -> None:
        super().__init__()
        self.select: str | None = None
        self.found: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "select":
            self.select = a.get("id")
        if tag in ("input", "textarea") and "value" in a:
            self.found.append((tag, a.get("id")))
        if tag == "option" and self.select is not None and (
                "selected" in a or a.get("value") not in ("", *map(str, range(3)))):
            self.found.append((tag, self.select))

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self.select = None


def _literal_values(html: str) -> list[tuple[str, str | None]]:
    parser = _ValueAttributes()
    parser.feed(html)
    return parser.found


def test_chat_page_has_no_sampling_defaults_of_its_own() -> None:
    """index.html sets no value on any field (the numbers come from GET /props), and this check
    does catch a literal default: the page as it once was, with value="0.8", fails it."""
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    for knob in KNOBS:
        assert f'id="{knob}"' in html, knob
    assert _literal_values(html) == []
    # negative controls: a default written into the page, or a preselected mirostat option
    literal = html.replace('id="temperature" type="number"',
                           'id="temperature" value="0.8" type="number"')
    assert _literal_values(literal) == [("input", "temperature")]
    preselected = html.replace('<option value="0">', '<option value="0" selected>')
    assert _literal_values(preselected) == [("option", "mirostat")]


def test_chat_page_streams_uses_knobs_and_stops(browser: Any, base_url: str, llm: LLM,
                                                engine: Engine, tmp_path: Path) -> None:
    d = browser
    d.get(base_url + "/")
    wait = WebDriverWait(d, HANG_GUARD, poll_frequency=0.02)
    wait.until(lambda drv: "smollm2-test" in drv.find_element(By.ID, "model").text)
    # the sampling fields show the server's defaults: those of pyllm.runtime.sampling, and the
    # chat route's token limit (-1 = until done)
    assert "2 slots × 512 tokens" in d.find_element(By.ID, "model").text
    defaults = {**{k: DEFAULTS[k] for k in KNOBS if k != "max_tokens"}, "max_tokens": -1}
    _assert_shows(d, defaults)
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
    engine.pause()  # the reply streams 3 tokens, then waits until the page has shown them
    try:
        d.find_element(By.ID, "send").click()
        wait_until(lambda: engine.queue_depth == 1, "the page's request")
        engine.resume(steps=3)
        assert engine.wait_held(HANG_GUARD)
        # text visible while the bubble is still marked as streaming (read in one atomic call)
        partial = wait.until(lambda drv: drv.execute_script(
            "const b = document.querySelector('.msg.assistant.streaming');"
            "return b && b.querySelector('.content').textContent || null;"))
    finally:
        engine.resume()
    wait.until(lambda drv: _last_assistant(drv).get_attribute("data-finish"))
    bubble = _last_assistant(d)
    final = bubble.find_element(By.CLASS_NAME, "content").text
    assert final.startswith(partial.strip()) and len(final) > len(partial.strip())
    # the reply is the greedy one for these knobs: temperature, max_tokens, system prompt
    assert final == expected.strip()
    assert bubble.get_attribute("data-finish") in ("stop", "length")
    assert "tokens/s" in d.find_element(By.ID, "status").text

    # 2. a long generation, stopped from the page: the server frees the slot. The scheduler is
    # held after a few tokens, so the generation is certainly still running at the click.
    cancelled = engine.stats.finished["cancelled"]
    generated = engine.stats.completion_tokens_total
    _set(d, "max_tokens", "400")
    _set(d, "input", "Write a very long story about a dragon.")
    engine.pause()
    try:
        d.find_element(By.ID, "send").click()
        wait_until(lambda: engine.queue_depth == 1, "the page's request")
        engine.resume(steps=4)
        assert engine.wait_held(HANG_GUARD)
        assert engine.active == 1  # still generating
        wait.until(lambda drv: len(drv.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
                   and _last_assistant(drv).find_element(By.CLASS_NAME, "content").text)
        assert d.find_element(By.ID, "stop").is_enabled()
        d.find_element(By.ID, "stop").click()
        wait.until(lambda drv: _last_assistant(drv).get_attribute("data-finish") == "stopped")
        wait_until(lambda: engine.cancels_pending == 1, "the stop to reach the server")
    finally:
        engine.resume()
    _wait_idle(engine)
    assert engine.stats.finished["cancelled"] == cancelled + 1
    assert engine.stats.completion_tokens_total == generated + 4  # none after the stop
    assert d.find_element(By.ID, "send").is_enabled()

    # 3. "Reset to defaults" brings back the server's defaults (temperature was 0, max 400)
    d.find_element(By.ID, "reset_knobs").click()
    _assert_shows(d, defaults)

    out = Path(os.environ.get("PYLLM_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    shot = out / "server_chat_page.png"
    assert d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def test_chat_page_with_api_key(browser: Any, engine: Engine) -> None:
    """On a server with --api-key the page is opened with ?api_key=KEY and works with it; a
    wrong key typed into the page is reported."""
    with serve(create_app(ServerConfig(model_id="keyed", api_key="k3y"), engine=engine)) as url:
        d = browser
        d.get(f"{url}/?api_key=k3y")
        wait = WebDriverWait(d, HANG_GUARD, poll_frequency=0.05)
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


def test_chat_page_json_schema(browser: Any, base_url: str, engine: Engine) -> None:
    """The JSON schema field constrains the reply (it parses and validates); a field that is
    not JSON is refused on the page without a request; a schema the server cannot use shows
    the server's message."""
    import jsonschema

    d = browser
    d.get(base_url + "/")
    d.execute_script("localStorage.clear();")
    d.get(base_url + "/")
    wait = WebDriverWait(d, HANG_GUARD, poll_frequency=0.02)
    wait.until(lambda drv: not drv.find_element(By.ID, "max_tokens").get_attribute("disabled"))
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0}}, "required": ["city", "population"]}
    try:
        _set(d, "json_schema", json.dumps(schema))
        _set(d, "max_tokens", "80")
        _set(d, "input", "Name a city and its population.")
        d.find_element(By.ID, "send").click()
        wait.until(lambda drv: _last_assistant(drv).get_attribute("data-finish"))
        bubble = _last_assistant(d)
        assert bubble.get_attribute("data-finish") == "stop"
        jsonschema.validate(json.loads(bubble.find_element(By.CLASS_NAME, "content").text),
                            schema)
        _wait_idle(engine)

        requests = engine.stats.requests_total
        n_errors = len(d.find_elements(By.CSS_SELECTOR, ".msg.error"))
        _set(d, "json_schema", '{"type": ')
        _set(d, "input", "again")
        d.find_element(By.ID, "send").click()
        wait.until(lambda drv: len(drv.find_elements(By.CSS_SELECTOR, ".msg.error")) > n_errors)
        error = d.find_elements(By.CSS_SELECTOR, ".msg.error")[-1].text
        assert "the JSON schema is not valid JSON" in error
        assert engine.stats.requests_total == requests  # nothing was sent

        _set(d, "json_schema", '{"type": "array", "uniqueItems": true}')
        _set(d, "input", "and again")
        d.find_element(By.ID, "send").click()
        wait.until(lambda drv: len(drv.find_elements(By.CSS_SELECTOR, ".msg.error"))
                   > n_errors + 1)
        error = d.find_elements(By.CSS_SELECTOR, ".msg.error")[-1].text
        assert 'JSON schema keyword(s) not supported: ["uniqueItems"]' in error
    finally:
        d.execute_script("localStorage.clear();")


def test_chat_page_fills_its_fields_from_props(browser: Any, base_url: str) -> None:
    """The fields show whatever GET /props says: with the response changed in the browser
    (every default plus one), the page shows the changed numbers. Saved settings would win over
    the defaults, so none are kept from the other tests."""
    d = browser
    d.get(base_url + "/")
    d.execute_script("localStorage.clear();")
    # a wrapper of fetch, installed before the page's own script runs
    script = d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        const realFetch = window.fetch;
        window.fetch = async (url, init) => {
          const resp = await realFetch(url, init);
          if (url !== "/props" || !resp.ok) return resp;
          const props = await resp.json();
          const params = props.default_generation_settings.params;
          for (const k of Object.keys(params))
            if (typeof params[k] === "number") params[k] = k === "mirostat" ? 2 : params[k] + 1;
          return new Response(JSON.stringify(props), {status: 200});
        };"""})
    try:
        d.get(base_url + "/")
        wait = WebDriverWait(d, HANG_GUARD, poll_frequency=0.02)
        wait.until(lambda drv: "smollm2-test" in drv.find_element(By.ID, "model").text)
        changed = {k: DEFAULTS[k] + 1 for k in KNOBS if k not in ("mirostat", "max_tokens")}
        _assert_shows(d, {**changed, "mirostat": 2, "max_tokens": 0})
    finally:
        d.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument",
                          {"identifier": script["identifier"]})
        d.execute_script("localStorage.clear();")


def test_chat_page_reports_props_it_cannot_load(browser: Any) -> None:
    """A server whose model failed to load answers /props with an error: the page says so in
    its status line and leaves the sampling fields empty and disabled."""
    def loader() -> Engine:
        raise ModelError("the model file is damaged")

    with serve(create_app(ServerConfig(), loader=loader)) as url:
        d = browser
        d.get(f"{url}/")
        wait = WebDriverWait(d, HANG_GUARD, poll_frequency=0.05)
        status = wait.until(lambda drv: drv.find_element(By.ID, "status").text)
        assert "Could not load the server's sampling defaults" in status
        assert "the model failed to load: the model file is damaged" in status
        assert _knob_values(d) == {k: ("", False) for k in KNOBS}
        assert not d.find_element(By.ID, "reset_knobs").is_enabled()


def test_chat_page_waits_for_a_loading_model(browser: Any, llm: LLM) -> None:
    """Opened while the model still loads (/props answers 503), the page says so, asks again,
    and fills its fields once the model is served."""
    release = threading.Event()

    def loader() -> Engine:
        release.wait(HANG_GUARD)
        return Engine(llm, n_parallel=1, n_ctx=64)

    with serve(create_app(ServerConfig(model_id="late"), loader=loader)) as url:
        try:
            d = browser
            d.get(f"{url}/")
            d.execute_script("localStorage.clear();")
            wait = WebDriverWait(d, HANG_GUARD, poll_frequency=0.05)
            wait.until(lambda drv: "loading the model" in drv.find_element(By.ID, "model").text)
            assert _knob_values(d) == {k: ("", False) for k in KNOBS}
            release.set()
            wait.until(lambda drv: "late · 1 slots × 64 tokens" in drv.find_element(By.ID,
                                                                                   "model").text)
            _assert_shows(d, {**{k: DEFAULTS[k] for k in KNOBS if k != "max_tokens"},
                              "max_tokens": -1})
            assert not d.find_element(By.ID, "status").text
        finally:
            release.set()
