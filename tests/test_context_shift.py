"""Context shift (``LLM.shift_context``, ``Context::seq_shift``): after dropping a span of the
cache and moving the rest down, the cache equals a fresh evaluation of the kept tokens at their
new positions, for every RoPE mode a Llama-family model uses; a mode whose angles depend on the
sequence length is refused.

"Equals" holds for what a shift can keep exact: the first layer's K/V rows (they depend on the
token and its position only), so the logits of one-layer models. Deeper layers' rows of a kept
token were computed attending to the dropped ones and keep that (as in llama.cpp): a fresh
evaluation differs there by design; the tests compare the first layer's rows of deeper models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pyllm.errors import ContextError
from tests.tiny_models import TinySpec, write_tiny

# one layer (the logits depend on the first layer's K/V only); heads of 32 (a Q8_0 cache's block)
ONE = dict(n_layer=1, n_embd=128, n_head=4, n_head_kv=2)
MODES = {
    "llama": TinySpec(**ONE),
    "neox (qwen2)": TinySpec(**ONE, arch="qwen2", biases=True),
    "linear": TinySpec(**ONE, rope_scaling={"type": "linear", "factor": 2.0}),
    "yarn": TinySpec(**ONE, rope_scaling={"type": "yarn", "factor": 4.0,
                                          "original_context_length": 64}),
    "rope_freqs (llama 3.1)": TinySpec(**ONE, rope_freqs=True),
    "partial rotary": TinySpec(**ONE, n_rot=16),
}


def _shifted_vs_fresh(path: Path, kv_type: str, keep: int, discard: int) -> tuple[float, float]:
    """The shifted context's next logits against a fresh evaluation of the kept tokens (same
    cache type), and that cache type's own error (fresh, against an F32 cache), both relative
    to the largest logit."""
    from pyllm.runtime.llm import LLM

    rng = np.random.default_rng(7)
    tokens = rng.integers(3, 150, 60).tolist()
    nxt = [11, 12]
    kept = tokens[:keep] + tokens[keep + discard:]
    with LLM(path, n_ctx=128, kv_type=kv_type) as a:
        a.eval(tokens)
        a.shift_context(keep, discard)
        assert a.tokens == kept
        got = np.stack([a.eval([nxt[0]]), a.eval([nxt[1]])])
    fresh = {}
    for kv in {kv_type, "f32"}:
        with LLM(path, n_ctx=128, kv_type=kv) as b:
            b.eval(kept)  # the same kernels as the shifted context's
            fresh[kv] = np.stack([b.eval([nxt[0]]), b.eval([nxt[1]])])
    scale = np.abs(fresh["f32"]).max()
    return (float(np.abs(got - fresh[kv_type]).max() / scale),
            float(np.abs(fresh[kv_type] - fresh["f32"]).max() / scale))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kv_type", ["f32", "f16", "q8_0"])
def test_shifted_cache_equals_a_fresh_evaluation(tmp_path: Path, mode: str, kv_type: str) -> None:
    """F32 keys: equal to F32 rounding. F16 / Q8_0 keys are rounded once more after the
    rotation: against a fresh cache of the same type, the shifted one differs by at most a few
    times that type's own error (a fresh F16 / Q8_0 cache against an F32 one): measured 0.1-2.6
    times (F32: 2e-7 .. 5.5e-7 of the largest logit)."""
    path = write_tiny(tmp_path / "m.gguf", MODES[mode])
    err, own = _shifted_vs_fresh(path, kv_type, keep=5, discard=27)
    assert err < (2e-6 if kv_type == "f32" else 3.5 * own), (err, own)


def test_without_re_rotation_the_keys_are_wrong(tmp_path: Path) -> None:
    """The control: dropping the span without rotating the moved keys (truncate + re-append of
    the same K/V rows is what a plain copy would give) is far outside the bound: a shift by 27
    positions, compared at 27 positions too far."""
    from pyllm.runtime.llm import LLM

    path = write_tiny(tmp_path / "m.gguf", MODES["llama"])
    rng = np.random.default_rng(7)
    tokens = rng.integers(3, 150, 60).tolist()
    with LLM(path, n_ctx=128, kv_type="f32") as a:
        kept = tokens[:5] + tokens[32:]
        want = a.logits(kept + [11])[-1]
        # the same tokens, all 27 positions later (what unrotated keys at new slots mean)
        a.reset()
        a.eval(tokens[:5] + [1] * 27)
        a.eval(tokens[32:])
        moved = a.eval([11])
    assert np.abs(moved - want).max() / np.abs(want).max() > 1e-2


def _layer_rows(llm, n_tokens: int, layer: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """Layer `layer`'s K and V rows of an F32 cache, from a saved state (header, then per
    layer the K rows then the V rows of the cached positions)."""
    hp = llm.hparams
    dim = hp.n_head_kv * hp.head_dim
    kv = np.frombuffer(llm.save_state().kv, dtype=np.float32, offset=20)
    per = n_tokens * dim
    k = kv[2 * per * layer: 2 * per * layer + per].reshape(n_tokens, dim)
    v = kv[2 * per * layer + per: 2 * per * (layer + 1)].reshape(n_tokens, dim)
    return k, v


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_deeper_models_first_layer_rows(tmp_path: Path, arch: str) -> None:
    from pyllm.runtime.llm import LLM

    path = write_tiny(tmp_path / "m.gguf", TinySpec(n_layer=3, arch=arch, biases=arch == "qwen2"))
    tokens = list(range(10, 50))
    kept = tokens[:4] + tokens[20:]
    with LLM(path, n_ctx=64, kv_type="f32") as a, LLM(path, n_ctx=64, kv_type="f32") as b:
        a.eval(tokens)
        a.shift_context(4, 16)
        b.eval(kept)
        ka, va = _layer_rows(a, len(kept), 0)
        kb, vb = _layer_rows(b, len(kept), 0)
        # moved as they are / re-rotated (the two evaluations' products differ in F32 rounding
        # only: 40 tokens take the prefill kernels, 24 the decode ones)
        assert np.abs(va - vb).max() <= 1e-5 * np.abs(vb).max()
        assert np.abs(ka - kb).max() <= 1e-5 * np.abs(kb).max()
        # layer 1 differs: its rows saw the dropped tokens (the module doc)
        k1a, _ = _layer_rows(a, len(kept), 1)
        k1b, _ = _layer_rows(b, len(kept), 1)
        assert np.abs(k1a[4:] - k1b[4:]).max() > 1e-3 * np.abs(k1b).max()


def test_dynamic_ntk_and_bad_bounds_are_refused(tmp_path: Path) -> None:
    from pyllm.runtime.llm import LLM

    spec = TinySpec(rope_scaling={"type": "dynamic", "factor": 2.0,
                                  "original_context_length": 64})
    path = write_tiny(tmp_path / "dyn.gguf", spec)
    with LLM(path, n_ctx=128) as llm:
        llm.eval(list(range(3, 40)))
        with pytest.raises(ContextError, match="dynamic NTK"):
            llm.shift_context(4, 10)
        assert len(llm.tokens) == 37  # nothing changed
    with LLM(write_tiny(tmp_path / "m.gguf", TinySpec()), n_ctx=128) as llm:
        llm.eval(list(range(3, 40)))
        for keep, discard in ((30, 10), (-1, 3), (3, 0)):
            with pytest.raises(ContextError, match="cannot shift"):
                llm.shift_context(keep, discard)
        assert len(llm.tokens) == 37


# ---- generation past a full context -----------------------------------------------------------


def test_generation_goes_on_past_a_full_context(smollm2_path: Path) -> None:
    from pyllm.runtime.completions import make_generation
    from pyllm.runtime.llm import LLM
    from pyllm.runtime.speculative import NgramDrafter

    with LLM(smollm2_path, n_ctx=64, n_threads=2) as llm:
        prompt = llm.tokenize("Once upon a time, in a land far away,")
        plain = make_generation(llm, prompt, max_tokens=150, stop=None, temperature=0.0)
        list(plain)
        assert plain.finish_reason == "length" and len(plain.tokens) == 64 - len(prompt)
        shifted = make_generation(llm, prompt, max_tokens=150, stop=None, temperature=0.0,
                                  context_shift=len(prompt))
        text = "".join(p.text for p in shifted)
        assert len(shifted.tokens) == 150 and shifted.n_shifts >= 3 and text
        assert llm.tokens[:len(prompt)] == prompt  # the kept part stays
        assert len(llm.tokens) < 64
        # until the shift, the same tokens as without it
        assert shifted.tokens[:len(plain.tokens)] == plain.tokens
        # speculative rounds shift at the same fill: the same tokens
        spec = make_generation(llm, prompt, max_tokens=150, stop=None, temperature=0.0,
                               context_shift=len(prompt), drafter=NgramDrafter())
        list(spec)
        assert spec.tokens == shifted.tokens and spec.n_shifts == shifted.n_shifts
        # a kept part that fills the context: the generation ends there
        full = make_generation(llm, prompt, max_tokens=150, stop=None, temperature=0.0,
                               context_shift=63)
        list(full)
        # (one token more than without a shift: the last one is sampled from a full cache, where
        # the step machine's own limit stops one short so that the cache never overruns)
        assert full.finish_reason == "length" and len(full.tokens) == len(plain.tokens) + 1
        assert full.n_shifts == 0
        with pytest.raises(ContextError, match="context_shift"):
            make_generation(llm, prompt, max_tokens=4, stop=None, context_shift=-1)


def test_cli_context_shift(smollm2_path: Path) -> None:
    from tests.test_cli import run_cli

    base = ("run", "-m", str(smollm2_path), "-p", "Once upon a time", "-n", "200", "-c", "64",
            "--temp", "0", "--verbose")
    off = run_cli(*base, timeout=120)
    on = run_cli(*base, "--context-shift", "--keep", "-1", timeout=120)
    assert off.returncode == 0 and on.returncode == 0, on.stderr
    assert "generation: 60 tokens" in off.stderr and "context shifts" not in off.stderr
    assert "generation: 200 tokens" in on.stderr and "context shifts" in on.stderr
    assert on.stdout.startswith(off.stdout.rstrip("\n"))
    bad = run_cli(*base, "--context-shift", "--keep", "-2", timeout=60)
    assert bad.returncode == 2 and "--keep" in bad.stderr


# ---- a chat past a full context ----------------------------------------------------------------

TURNS = ["Tell me a long story about a dragon.", "And then what happened?", "Tell me more.",
         "What was the name of the dragon?"]


def test_conversation_matches_the_re_rendered_chat_while_it_fits(smollm2_path: Path) -> None:
    """With room to spare (no shift) the running token stream is the re-rendered
    conversation: the same replies as LLM.chat with the whole history each turn."""
    from pyllm.runtime.conversation import Conversation
    from pyllm.runtime.llm import LLM

    system = [{"role": "system", "content": "You are a storyteller."}]
    with LLM(smollm2_path, n_ctx=2048, n_threads=2) as llm:
        conv = Conversation(llm, system)
        replies = ["".join(conv.say(t, max_tokens=40, temperature=0.0)) for t in TURNS]
        assert conv.n_shifts == 0 and conv._rendered is not None  # the running stream held
        history = list(system)
        for turn, reply in zip(TURNS, replies, strict=True):
            history.append({"role": "user", "content": turn})
            assert llm.chat(history, max_tokens=40, temperature=0.0) == reply
            history.append({"role": "assistant", "content": reply})


def test_conversation_goes_on_past_the_context(smollm2_path: Path) -> None:
    from pyllm.runtime.conversation import Conversation
    from pyllm.runtime.generation import chat_prompt
    from pyllm.runtime.llm import LLM

    system = [{"role": "system", "content": "You are a storyteller."}]
    with LLM(smollm2_path, n_ctx=160, n_threads=2) as llm:
        first, _ = chat_prompt(llm, [*system, {"role": "user", "content": TURNS[0]}], None)
        conv = Conversation(llm, system, keep=12)
        total = 0
        for turn in TURNS * 2:
            reply = "".join(conv.say(turn, max_tokens=60, temperature=0.0))
            assert reply
            total += len(llm.tokenize(reply, add_special=False))
        assert total > 160 and conv.n_shifts >= 3
        assert llm.tokens[:12] == first[:12]  # the kept start (the system prompt's)
        assert len(conv.messages) == 1 + 2 * len(TURNS) * 2
        # the kept part cannot fill the context: a clear error
        tight = Conversation(llm, system, keep=None)
        with pytest.raises(ContextError):
            for turn in TURNS * 3:
                "".join(tight.say(turn * 8, max_tokens=60, temperature=0.0))


def test_cli_chat_context_shift(smollm2_path: Path) -> None:
    from tests.test_cli import run_cli

    stdin = "\n".join(TURNS) + "\n"
    base = ("chat", "-m", str(smollm2_path), "-c", "160", "-n", "100", "--temp", "0")
    off = run_cli(*base, stdin=stdin, timeout=120)
    assert off.returncode == 1 and "no room to generate" in off.stderr
    on = run_cli(*base, "--context-shift", "--keep", "-1", stdin=stdin, timeout=120)
    assert on.returncode == 0, on.stderr
    assert on.stdout.count("> ") >= len(TURNS) and "error" not in on.stderr
