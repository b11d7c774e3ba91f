"""The server's slot states (llama.cpp's ``--slot-save-path``, ``GET /slots``,
``POST /slots/{id}?action=save|restore|erase``): a saved slot restored into another slot
continues exactly; files stay inside the folder; bad names, busy slots, foreign or damaged
files get 4xx errors; without --slot-save-path saving is off (501)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pyllm.runtime.llm import LLM
from pyllm.runtime.sampling import SamplingParams
from pyllm.server.admin import valid_slot_filename
from pyllm.server.app import ServerConfig, create_app
from pyllm.server.engine import DoneEvent, Engine, Request, TokenEvent
from tests.conftest import serve

PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs into the forest where"


@pytest.fixture(scope="module")
def llm(smollm2_path: Path) -> Iterator[LLM]:
    with LLM(smollm2_path, n_ctx=256, n_threads=2) as model:
        yield model


@pytest.fixture(scope="module")
def engine(llm: LLM) -> Iterator[Engine]:
    eng = Engine(llm, n_parallel=2, n_ctx=256)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slots")


@pytest.fixture(scope="module")
def url(engine: Engine, folder: Path) -> Iterator[str]:
    with serve(create_app(ServerConfig(model_id="m", slot_save_path=str(folder)),
                          engine=engine)) as u:
        yield u


def _generate(engine: Engine, tokens: list[int], n: int) -> list[int]:
    out: list[int] = []
    done = threading.Event()

    def on_event(ev: object) -> None:
        if isinstance(ev, TokenEvent) and ev.token is not None:
            out.append(ev.token)
        if isinstance(ev, DoneEvent):
            done.set()
    engine.submit(Request(tokens, SamplingParams(temperature=0.0), on_event, max_tokens=n))
    assert done.wait(60)
    return out


def _slot_holding(engine: Engine, n: int) -> int:
    (slot,) = [s["id"] for s in engine.slots_info() if s["n_cached"] == n]
    return slot


def test_save_erase_restore_continues_exactly(url: str, engine: Engine, llm: LLM,
                                              folder: Path) -> None:
    prompt = llm.tokenize(PROMPT)
    first = _generate(engine, prompt, 8)
    cached = len(prompt) + 7  # the last token is sampled, never fed
    slot = _slot_holding(engine, cached)
    info = httpx.get(f"{url}/slots").json()
    assert {s["id"] for s in info} == {0, 1} and not any(s["is_processing"] for s in info)
    saved = httpx.post(f"{url}/slots/{slot}?action=save", json={"filename": "a.bin"}).json()
    assert saved["id_slot"] == slot and saved["n_saved"] == cached
    assert (folder / "a.bin").stat().st_size == saved["n_written"]
    assert not [p for p in folder.iterdir() if ".pyllm-tmp-" in p.name]
    erased = httpx.post(f"{url}/slots/{slot}?action=erase").json()
    assert erased == {"id_slot": slot, "n_erased": cached, "timings": erased["timings"]}
    assert engine.slots_info()[slot]["n_cached"] == 0
    other = 1 - slot
    httpx.post(f"{url}/slots/{other}?action=erase")
    restored = httpx.post(f"{url}/slots/{other}?action=restore",
                          json={"filename": "a.bin"}).json()
    assert restored["n_restored"] == cached and restored["id_slot"] == other
    # the same request now finds its prefix in the restored slot: only 1 token evaluated,
    # and the continuation is the one of a slot that computed it
    before = engine.stats.prompt_tokens_evaluated
    again = _generate(engine, prompt + first[:-1], 6)
    assert engine.stats.prompt_tokens_evaluated - before == 1
    want = llm.generate(prompt + first[:-1], max_tokens=6, temperature=0.0)
    assert llm.detokenize(again) == want


def test_file_names_stay_in_the_folder(url: str) -> None:
    for name in ("../x.bin", "a/b.bin", "..", ".hidden", "", "a\\b", "x" * 300, "a\0b"):
        assert not valid_slot_filename(name), name
        r = httpx.post(f"{url}/slots/0?action=save", json={"filename": name})
        assert r.status_code == 400 and r.json()["error"]["param"] == "filename", name
    assert valid_slot_filename("slot-0.state")


@pytest.mark.parametrize("how,status,match", [
    ("missing", 404, "no saved slot"),
    ("damaged", 400, "corrupt"),
    ("not a state", 400, "not a pyllm state file"),
])
def test_bad_restores(url: str, engine: Engine, llm: LLM, folder: Path, how: str, status: int,
                      match: str) -> None:
    if how != "missing":
        _generate(engine, llm.tokenize(PROMPT), 2)
        slot = _slot_holding(engine, len(llm.tokenize(PROMPT)) + 1)
        httpx.post(f"{url}/slots/{slot}?action=save", json={"filename": "b.bin"})
        data = bytearray((folder / "b.bin").read_bytes())
        if how == "damaged":
            data[len(data) // 2] ^= 1
        else:
            data[:4] = b"GGUF"
        (folder / "b.bin").write_bytes(bytes(data))
    r = httpx.post(f"{url}/slots/0?action=restore",
                   json={"filename": "b.bin" if how != "missing" else "none.bin"})
    assert r.status_code == status and match in r.json()["error"]["message"]


def test_bad_actions_and_slots(url: str) -> None:
    assert httpx.post(f"{url}/slots/0?action=fly").status_code == 400
    assert httpx.post(f"{url}/slots/7?action=erase").status_code == 400
    assert httpx.post(f"{url}/slots/x?action=erase").status_code == 400


def test_a_busy_slot_is_refused(engine: Engine, llm: LLM, folder: Path) -> None:
    """A slot that is generating cannot be saved or erased (its cache is changing)."""
    engine.pause()
    try:
        engine.submit(Request(llm.tokenize(PROMPT), SamplingParams(temperature=0.0),
                              lambda ev: None, max_tokens=50))
        engine.resume(2)  # admitted and running
        assert engine.wait_held(30)
        busy = [s["id"] for s in engine.slots_info() if s["is_processing"]]
        assert busy
        holder: list[BaseException] = []

        def act() -> None:
            try:
                engine.slot_action(busy[0], "erase", timeout=30)
            except BaseException as e:
                holder.append(e)
        t = threading.Thread(target=act)
        t.start()
        engine.resume(1)  # one step: the op runs between steps, the slot still busy
        t.join(30)
        assert holder and "busy" in str(holder[0])
    finally:
        engine.resume()


def test_saving_is_off_without_a_folder(engine: Engine) -> None:
    with serve(create_app(ServerConfig(model_id="m"), engine=engine)) as u:
        r = httpx.post(f"{u}/slots/0?action=save", json={"filename": "a.bin"})
        assert r.status_code == 501 and "--slot-save-path" in r.json()["error"]["message"]
        assert httpx.post(f"{u}/slots/0?action=erase").status_code == 200


def test_cache_ram_brings_back_a_reused_slots_prefix(llm: LLM) -> None:
    """One slot, two long prompts in turn: with --cache-ram the slot's cache is kept in host
    memory before it is overwritten and restored when its prompt returns (1 token evaluated
    instead of all), with the same replies as without; bounded by its size (LRU)."""
    from pyllm.server.admin import metrics_text
    from pyllm.server.app import _State

    a = "A long conversation about dragons and their treasures. " * 8
    b = "Another long conversation about ships and the sea. " * 8
    runs = {}
    for mib in (0, 64):
        eng = Engine(llm, n_parallel=1, n_ctx=256, cache_ram_mib=mib)
        try:
            evaluated, replies = [], []
            for text in (a, b, a, b):
                before = eng.stats.prompt_tokens_evaluated
                replies.append(_generate(eng, llm.tokenize(text), 6))
                evaluated.append(eng.stats.prompt_tokens_evaluated - before)
            runs[mib] = (evaluated, replies, eng.stats.cache_ram_hits, eng.stats.cache_ram_bytes)
            metrics = metrics_text(_State(ServerConfig(model_id="m"), eng))
        finally:
            eng.stop()
    n = len(llm.tokenize(a))
    assert runs[0][0] == [n] * 4 and runs[0][2] == 0  # the control: every prompt in full
    assert runs[64][0] == [n, n, 1, 1] and runs[64][2] == 2
    assert runs[64][1] == runs[0][1]  # the same replies
    assert "pyllm_cache_ram_hits_total 2" in metrics
    # bounded: a limit below one slot's state keeps nothing
    tiny = Engine(llm, n_parallel=1, n_ctx=256, cache_ram_mib=1)
    try:
        for text in (a, b, a):
            _generate(tiny, llm.tokenize(text), 2)
        assert tiny.stats.cache_ram_hits == 0 and tiny.stats.cache_ram_bytes == 0
    finally:
        tiny.stop()
