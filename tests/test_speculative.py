"""Speculative decoding (pyllm.runtime.speculative, Generation's rounds): prompt lookup and draft
models give the same tokens as plain decoding (greedy, and sampled with the same seed), drafts
are rolled back out of the KV cache, the output distribution is the target's (chi-square), and
bad settings or an incompatible draft model are refused."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from pyllm.errors import SpeculativeError
from pyllm.runtime.speculative import DraftModel, NgramDrafter
from tests.test_sampling import CHI2_999, _chi_square

PARAGRAPH = ("The quick brown fox jumps over the lazy dog. Every morning the fox runs through the "
             "forest, past the old mill and across the river, before it returns to its den under "
             "the big oak tree. The dog sleeps all day in the sun and never notices the fox.")
COPY_TASK = [{"role": "user", "content": "Repeat the following paragraph word for word:\n\n"
              + PARAGRAPH}]


@pytest.fixture(scope="module")
def smol(smollm2_path: Path):  # type: ignore[no-untyped-def]
    from pyllm.runtime.llm import LLM

    with LLM(smollm2_path, n_ctx=512, n_threads=2) as llm:
        yield llm


def _generate(llm, tokens: Sequence[int], drafter=None, **kw):  # type: ignore[no-untyped-def]
    from pyllm.runtime.completions import make_generation

    gen = make_generation(llm, list(tokens), max_tokens=kw.pop("max_tokens", 96), stop=None,
                          drafter=drafter, **kw)
    text = "".join(p.text for p in gen)
    return gen, text


def _copy_prompt(llm) -> list[int]:  # type: ignore[no-untyped-def]
    from pyllm.runtime.generation import chat_prompt

    return chat_prompt(llm, COPY_TASK, None)[0]


# ---- the prompt-lookup drafter ----------------------------------------------------------------


def test_ngram_drafter_continues_the_latest_longest_match() -> None:
    d = NgramDrafter(ngram_max=3, ngram_min=2, draft_max=4)
    #        0  1  2  3  4  5  6  7  8  9 10 11
    toks = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 1, 2]
    # suffix (1, 2) last occurred at 5 (followed by 3 7 8 1); the 3-gram (8, 1, 2) never before
    assert d.draft(toks, 10) == [3, 7, 8, 1]
    assert d.draft(toks, 2) == [3, 7]  # the caller's room
    toks += [3]  # (1, 2, 3): latest earlier match at 5 -> 7 8 1 2
    assert d.draft(toks, 10) == [7, 8, 1, 2]
    assert d.draft([5, 6, 7], 10) == []  # a new context (no earlier match) rebuilds the index
    assert d.draft([4, 4], 10) == []  # the suffix itself is no match
    assert d.draft([4, 4, 4], 10) == [4]


@pytest.mark.parametrize("kwargs", [dict(ngram_max=0), dict(ngram_min=3, ngram_max=2),
                                    dict(draft_max=0), dict(draft_min=-1), dict(draft_max=1.5)])
def test_ngram_drafter_bad_settings(kwargs: dict) -> None:
    with pytest.raises(SpeculativeError):
        NgramDrafter(**kwargs)


# ---- the same tokens as plain decoding --------------------------------------------------------


@pytest.mark.parametrize("sampling", [dict(temperature=0.0),
                                      dict(temperature=0.9, top_k=40, seed=1234),
                                      dict(temperature=0.7, repeat_penalty=1.3, seed=5)])
def test_prompt_lookup_gives_the_plain_tokens(smol, sampling: dict) -> None:  # type: ignore[no-untyped-def]
    """Greedy and sampled (same seed: the sampler draws once per produced token either way):
    token for token the plain generation, while most drafted tokens are kept on a copy task."""
    prompt = _copy_prompt(smol)
    plain, text = _generate(smol, prompt, **sampling)
    spec, spec_text = _generate(smol, prompt, NgramDrafter(), **sampling)
    assert spec.tokens == plain.tokens and spec_text == text
    assert spec.finish_reason == plain.finish_reason
    assert spec.spec.rounds > 0 and spec.spec.drafted > 0
    if sampling["temperature"] == 0.0:
        # the reply copies the paragraph: measured 81 % of the drafted tokens kept
        assert spec.spec.acceptance > 0.6, spec.spec
        assert "its den under the big oak tree" in text


class WrongDrafter:
    """Drafts tokens the model will not produce (a control: every round rolls back)."""

    draft_max, draft_min = 7, 0

    def attach(self, target: object) -> None:
        return None

    def draft(self, tokens: Sequence[int], n_max: int) -> list[int]:
        return [(tokens[-1] + 7 * i + 3) % 40000 for i in range(min(n_max, self.draft_max))]


def test_rejected_drafts_are_rolled_back(smol) -> None:  # type: ignore[no-untyped-def]
    prompt = _copy_prompt(smol)
    plain, _ = _generate(smol, prompt, max_tokens=40, temperature=0.0)
    after_plain = smol.tokens
    spec, _ = _generate(smol, prompt, WrongDrafter(), max_tokens=40, temperature=0.0)
    assert spec.tokens == plain.tokens
    assert spec.spec.accepted == 0 and spec.spec.drafted >= spec.spec.rounds > 0
    # the cache holds what plain decoding leaves: the prompt and all but the last token
    assert smol.tokens == after_plain == prompt + plain.tokens[:-1]
    # and it is the right cache: the next token's logits equal a fresh evaluation's
    got = smol.eval([plain.tokens[-1]])
    want = smol.logits(prompt + plain.tokens)[-1]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())


def test_drafts_stop_at_the_context_and_token_limits(smol, smollm2_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pyllm.runtime.llm import LLM

    prompt = _copy_prompt(smol)
    n_ctx = len(prompt) + 21  # the reply is longer: the context ends it
    with LLM(smollm2_path, n_ctx=n_ctx, n_threads=2) as llm:
        for max_tokens in (None, 5):  # the context ends it / the token limit does
            plain, _ = _generate(llm, prompt, max_tokens=max_tokens, temperature=0.0)
            spec, _ = _generate(llm, prompt, NgramDrafter(), max_tokens=max_tokens,
                                temperature=0.0)
            assert spec.tokens == plain.tokens and spec.finish_reason == "length"
            assert len(spec.tokens) == (21 if max_tokens is None else 5)
            assert spec.spec.drafted > 0
            assert len(llm.tokens) < n_ctx


def test_draft_model_gives_the_plain_tokens(smol, smollm2_path: Path) -> None:  # type: ignore[no-untyped-def]
    """SmolLM2 drafting for itself: the same tokens, nearly every draft kept (both run the same
    weights; a draft is cut where the draft model's top probability is under p_min)."""
    prompt = _copy_prompt(smol)
    plain, _ = _generate(smol, prompt, max_tokens=48, temperature=0.0)
    draft = DraftModel(smollm2_path, n_ctx=512, n_threads=2, p_min=0.0)
    try:
        spec, _ = _generate(smol, prompt, draft, max_tokens=48, temperature=0.0)
    finally:
        draft.close()
    assert spec.tokens == plain.tokens
    assert spec.spec.acceptance > 0.95, spec.spec  # measured 1.0


def _tiny_with_vocab(vocab_gguf: Path, dst: Path, swap: tuple[int, int] | None = None) -> Path:
    """A tiny random Llama carrying the tokenizer of ``vocab_gguf`` (two token texts swapped)."""
    from pyllm.formats.gguf import GGUFReader, GGUFWriter
    from tests.tiny_models import TinySpec, write_tiny

    with GGUFReader(vocab_gguf) as voc:
        meta = {k: v for k, v in voc.metadata.items() if k.startswith("tokenizer.")}
        types = voc.value_types
    tokens = list(meta["tokenizer.ggml.tokens"])
    if swap is not None:
        a, b = swap
        tokens[a], tokens[b] = tokens[b], tokens[a]
        meta["tokenizer.ggml.tokens"] = tokens
    raw = write_tiny(dst.with_name(dst.name + ".raw"), TinySpec(n_vocab=len(tokens), ctx=1024))
    with GGUFReader(raw) as r:
        w = GGUFWriter(dst)
        w.add_metadata(r.metadata, r.value_types)
        w.add_metadata(meta, {k: types[k] for k in meta if k in types})
        for t in r.tensors:
            w.add_tensor(t.name, np.array(t.data), t.type, t.dims)
        w.write()
    raw.unlink()
    return dst


@pytest.mark.parametrize("case,match", [
    ("gpt-2", "BOS / EOS differ"),
    ("swapped", "token 1000 differs"),
    ("none", "has no tokenizer"),
])
def test_a_draft_model_of_another_vocabulary_is_refused(smol, smollm2_path: Path, vocab_dir: Path,
                                                        tmp_path: Path, case: str, match: str
                                                        ) -> None:  # type: ignore[no-untyped-def]
    from tests.tiny_models import TinySpec, write_tiny

    if case == "gpt-2":
        path = _tiny_with_vocab(vocab_dir / "ggml-vocab-gpt-2.gguf", tmp_path / "d.gguf")
    elif case == "swapped":
        path = _tiny_with_vocab(smollm2_path, tmp_path / "d.gguf", swap=(1000, 1001))
    else:
        path = write_tiny(tmp_path / "d.gguf", TinySpec(ctx=1024))
    draft = DraftModel(path, n_ctx=512)
    try:
        with pytest.raises(SpeculativeError, match=match):
            _generate(smol, _copy_prompt(smol), draft, max_tokens=4)
    finally:
        draft.close()
    # the control: SmolLM2's own vocabulary on the same tiny weights is accepted
    if case == "swapped":
        ok = DraftModel(_tiny_with_vocab(smollm2_path, tmp_path / "ok.gguf"), n_ctx=512)
        try:
            gen, _ = _generate(smol, _copy_prompt(smol), ok, max_tokens=8, temperature=0.0)
            assert len(gen.tokens) == 8
        finally:
            ok.close()


# ---- the output distribution is the target's --------------------------------------------------


class FixedDrafter:
    """Always drafts the same token (accepted with its probability under the target)."""

    def __init__(self, token: int) -> None:
        self.token, self.draft_max, self.draft_min = token, 4, 0

    def attach(self, target: object) -> None:
        return None

    def draft(self, tokens: Sequence[int], n_max: int) -> list[int]:
        return [self.token] * min(n_max, 1)


def test_sampled_tokens_follow_the_target_distribution(smol) -> None:  # type: ignore[no-untyped-def]
    """Chi-square over the 8 surviving candidates (top_k 8): the second generated token, where
    a one-token draft is checked (kept sometimes, rejected other times), against the target's
    distribution given the first; and a wrong temperature is rejected by the same test (its
    power)."""
    from pyllm.runtime.sampling import Sampler, SamplingParams

    prompt = smol.tokenize("The quick brown fox")
    params = dict(temperature=1.0, top_k=8, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    first = smol.logits(prompt)[-1]
    chain = Sampler(SamplingParams(**params), smol.n_vocab)
    ids, _ = chain.candidates(first)
    # the draft: the candidate ranked second after the most probable first token
    after_best, _ = chain.candidates(smol.logits([*prompt, int(ids[0])])[-1])
    draft_token = int(after_best[1])
    n = 1500
    pairs = []
    for seed in range(n):
        # 3 tokens: the draft (1 token) is checked at the second; the third is not drafted
        gen, _ = _generate(smol, prompt, FixedDrafter(draft_token), max_tokens=3, seed=seed,
                           **params)
        assert len(gen.tokens) == 3 and gen.spec.drafted == 1
        pairs.append(tuple(gen.tokens[:2]))
    firsts = np.array([a for a, _ in pairs])
    seconds = np.array([b for _, b in pairs])
    p1 = dict(zip(*map(lambda a: a.tolist(), chain.candidates(first)), strict=True))
    cond: dict[int, dict[int, float]] = {}
    for t1 in set(firsts.tolist()):
        cid, cp = chain.candidates(smol.logits([*prompt, t1])[-1])
        cond[t1] = dict(zip(cid.tolist(), cp.tolist(), strict=True))
    # the expected distribution of the second token over all the draws' first tokens
    want2: dict[int, float] = {}
    for t1 in firsts.tolist():
        for t, p in cond[t1].items():
            want2[t] = want2.get(t, 0.0) + p / n
    for draws, want in ((firsts, p1), (seconds, want2)):
        stat, df = _chi_square(draws, want)
        crit = CHI2_999.get(df) or df + 3.1 * math.sqrt(2 * df)
        assert stat < crit, (stat, df, crit)
    assert int(np.sum(seconds == draft_token)) > 0  # the draft was kept sometimes...
    assert int(np.sum(seconds != draft_token)) > 0  # ... and rejected other times
    hot = Sampler(SamplingParams(**dict(params, temperature=1.6)), smol.n_vocab)
    hid, hp = hot.candidates(first)
    stat, df = _chi_square(firsts, dict(zip(hid.tolist(), hp.tolist(), strict=True)))
    assert stat > CHI2_999.get(df, 50.0)


# ---- the CLI -----------------------------------------------------------------------------------


def test_cli_run_with_prompt_lookup(smollm2_path: Path) -> None:
    from tests.test_cli import run_cli

    prompt = "Repeat the following paragraph word for word:\n\n" + PARAGRAPH + "\n\n"
    common = ("run", "-m", str(smollm2_path), "-p", prompt, "-n", "60", "--temp", "0", "-t", "2")
    plain = run_cli(*common, timeout=120)
    spec = run_cli(*common, "--spec", "ngram", "--draft-max", "8", "--verbose", timeout=120)
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    line = next(x for x in spec.stderr.splitlines() if x.startswith("speculative:"))
    drafted, accepted = (int(w) for w in re.findall(r"(\d+) tokens drafted, (\d+)", line)[0])
    assert 0 < accepted <= drafted


@pytest.mark.parametrize("flags,code,message", [
    (("--spec", "ngram", "--draft-p-min", "2"), 2, "--draft-p-min"),
    (("--spec", "ngram", "--spec-ngram-min", "4"), 2, "ngram_min"),
    (("--spec", "ngram", "--draft-max", "0"), 2, "--draft-max"),
    (("--spec", "ngram", "--draft-model", "x.gguf"), 2, "not allowed with"),
    (("--draft-model", "TINY"), 1, "cannot draft for this model"),
])
def test_cli_speculative_errors(smollm2_path: Path, tmp_path: Path, flags: tuple[str, ...],
                                code: int, message: str) -> None:
    from tests.test_cli import run_cli
    from tests.tiny_models import TinySpec, write_tiny

    tiny = write_tiny(tmp_path / "tiny.gguf", TinySpec())
    flags = tuple(str(tiny) if f == "TINY" else f for f in flags)
    proc = run_cli("run", "-m", str(smollm2_path), "-p", "hi", "-n", "4", "-c", "256", *flags,
                   timeout=120)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    if code == 1:
        assert [x for x in proc.stderr.splitlines() if x.startswith("error:")] == \
            [proc.stderr.strip().splitlines()[-1]]


def test_llm_default_draft_model_and_api(smollm2_path: Path) -> None:
    """LLM(draft_model=...) drafts for generate / stream / chat / create_completion (as
    llama-cpp-python's Llama(draft_model=...)), the same text as without it."""
    from pyllm.runtime.llm import LLM

    class Counting(NgramDrafter):
        calls = 0

        def draft(self, tokens: Sequence[int], n_max: int) -> list[int]:
            Counting.calls += 1
            return super().draft(tokens, n_max)

    with LLM(smollm2_path, n_ctx=512, n_threads=2) as plain, \
            LLM(smollm2_path, n_ctx=512, n_threads=2, draft_model=Counting()) as fast:
        for llm_call in (lambda m: m.chat(COPY_TASK, max_tokens=40, temperature=0.0),
                         lambda m: m.generate(PARAGRAPH + "\n" + PARAGRAPH[:40], max_tokens=30,
                                              temperature=0.0),
                         lambda m: m.create_completion(PARAGRAPH + "\n" + PARAGRAPH[:40],
                                                       max_tokens=30, temperature=0.0)
                         ["choices"][0]["text"]):
            before = Counting.calls
            assert llm_call(fast) == llm_call(plain)
            assert Counting.calls > before  # the default drafter drafted
        # a call's drafter overrides the default
        before = Counting.calls
        assert fast.generate(PARAGRAPH, max_tokens=20, temperature=0.0,
                             drafter=WrongDrafter()) == \
            plain.generate(PARAGRAPH, max_tokens=20, temperature=0.0)
        assert Counting.calls == before


def test_a_round_gives_one_token_calls_logits_bit_for_bit(smollm2_path: Path) -> None:
    """Why greedy output is exactly plain decoding's: below the prefill threshold (the most a
    round evaluates) the decode kernels give each token's logits bit for bit as a one-token call
    does, on every ISA; at the threshold the prefill kernels round differently (the control)."""
    from pyllm import _core
    from pyllm.runtime.llm import LLM

    active = _core.active_isa()
    try:
        for isa in _core.available_isas():
            _core.set_active_isa(isa)
            with LLM(smollm2_path, n_ctx=256, n_threads=2) as llm:
                llm.eval_prompt(llm.tokenize("The quick brown fox jumps over the lazy dog and"))
                base = len(llm.tokens)
                top = int(_core.matmat_min_tokens())
                extra = [(253 + 977 * i) % 49152 for i in range(top)]
                for n in (2, _core.MATVEC_TOKENS + 1, top - 1, top):
                    llm.truncate(base)
                    rows = llm.eval_all(extra[:n])
                    llm.truncate(base)
                    single = np.stack([llm.eval_token(t) for t in extra[:n]])
                    if n < top:
                        assert np.array_equal(rows, single), (isa, n)
                    else:
                        assert not np.array_equal(rows, single), (isa, n)
    finally:
        _core.set_active_isa(active)


# ---- the server: per slot, in the same batch --------------------------------------------------


@pytest.mark.parametrize("kind", ["ngram", "draft model"])
def test_engine_drafts_per_slot_in_one_batch(smol, smollm2_path: Path,  # type: ignore[no-untyped-def]
                                             kind: str) -> None:
    """Four concurrent chats copying their input: with prompt lookup per slot the same tokens
    as without, most drafts kept, drafts of several slots in the same decode_batch; the metrics
    count them."""
    import threading

    from pyllm.runtime.generation import chat_prompt
    from pyllm.runtime.sampling import SamplingParams
    from pyllm.server.engine import DoneEvent, Engine, ErrorEvent, Request, TokenEvent

    tasks = [f"Repeat the following paragraph word for word:\n\n{PARAGRAPH}",
             f"{PARAGRAPH}\n\nCopy the last sentence of the text above.",
             "Fix the typos in this paragraph and write it out:\n\n"
             + PARAGRAPH.replace("forest", "forrest").replace("river", "rivr"),
             f"Repeat word for word: {PARAGRAPH[:80]}"]
    prompts = [chat_prompt(smol, [{"role": "user", "content": t}], None)[0] for t in tasks]

    def run(engine: Engine) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in prompts]
        done = threading.Barrier(len(prompts) + 1, timeout=120)

        def sink(i: int):  # type: ignore[no-untyped-def]
            def on_event(ev: object) -> None:
                assert not isinstance(ev, ErrorEvent), ev
                if isinstance(ev, TokenEvent) and ev.token is not None:
                    out[i].append(ev.token)
                if isinstance(ev, DoneEvent):
                    threading.Thread(target=done.wait).start()
            return on_event

        for i, p in enumerate(prompts):
            engine.submit(Request(p, SamplingParams(temperature=0.0), sink(i), max_tokens=100))
        done.wait()
        return out

    steps_seen: list[int] = []
    plain_engine = Engine(smol, n_parallel=4, n_ctx=512)
    try:
        plain = run(plain_engine)
    finally:
        plain_engine.stop()
    spec_engine = (Engine(smol, n_parallel=4, n_ctx=512, drafter=NgramDrafter)
                   if kind == "ngram" else
                   Engine(smol, n_parallel=4, n_ctx=512, draft_model=smollm2_path,
                          draft_p_min=0.0))
    try:
        decode = spec_engine._ctx.decode_batch

        def spy(tokens, seqs, want):  # type: ignore[no-untyped-def]
            steps_seen.append(len(set(np.asarray(seqs)[np.asarray(want) == 1].tolist())))
            return decode(tokens, seqs, want)

        spec_engine._ctx = _Spy(spec_engine._ctx, spy)
        spec = run(spec_engine)
        st = spec_engine.stats
        from pyllm.server.admin import metrics_text
        from pyllm.server.app import ServerConfig, _State

        text = metrics_text(_State(ServerConfig(model_id="m"), spec_engine))
        assert f"pyllm_draft_tokens_total {st.draft_tokens_total}" in text
        assert f"pyllm_draft_tokens_accepted_total {st.draft_tokens_accepted}" in text
    finally:
        spec_engine.stop()
    assert spec == plain and all(len(t) > 5 for t in plain)
    # measured 87 % (prompt lookup), 100 % (the model drafting for itself)
    assert st.draft_tokens_accepted > (0.6 if kind == "ngram" else 0.95) * st.draft_tokens_total
    assert st.draft_tokens_total > 0
    assert max(steps_seen) == 4  # rows (drafts) of all four slots in one batch


class _Spy:
    """A context whose decode_batch is wrapped (the rest passes through)."""

    def __init__(self, ctx: object, decode_batch: object) -> None:
        self._ctx, self.decode_batch = ctx, decode_batch

    def __getattr__(self, name: str) -> object:
        return getattr(self._ctx, name)


def test_cli_serve_speculative_flags(smollm2_path: Path) -> None:
    from tests.test_cli import run_cli

    bad = run_cli("serve", "-m", str(smollm2_path), "--port", "0", "--spec", "ngram",
                  "--spec-ngram-min", "5", timeout=60)
    assert bad.returncode == 2 and "ngram_min" in bad.stderr
    missing = run_cli("serve", "-m", str(smollm2_path), "--port", "0", "--draft-model",
                      "/nonexistent/x.gguf", timeout=60)
    assert missing.returncode == 1 and "x.gguf" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_drafts_under_a_grammar(smol) -> None:  # type: ignore[no-untyped-def]
    """A grammar and drafts together: the same constrained tokens as without drafting; a
    drafted token the grammar forbids is never kept (the sample under the grammar's mask
    cannot equal it), so such a draft ends at it."""
    from pyllm.runtime.grammar import Grammar

    grammar = Grammar.regex(r"(yes|no)( and (yes|no)){0,8}")
    prompt = smol.tokenize("Answer with yes or no, several times:")
    plain, text = _generate(smol, prompt, None, max_tokens=40, temperature=0.0, grammar=grammar)
    bad = FixedDrafter(smol.tokenize(" maybe", add_special=False)[0])
    spec, spec_text = _generate(smol, prompt, bad, max_tokens=40, temperature=0.0,
                                grammar=grammar)
    assert spec.tokens == plain.tokens and spec_text == text
    assert spec.spec.drafted > 0 and spec.spec.accepted == 0
    lookup, _ = _generate(smol, prompt, NgramDrafter(ngram_min=1), max_tokens=40,
                          temperature=0.0, grammar=grammar)
    assert lookup.tokens == plain.tokens


def test_engine_refuses_a_draft_model_of_another_vocabulary(smol, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pyllm.server.engine import Engine
    from tests.tiny_models import TinySpec, write_tiny

    tiny = write_tiny(tmp_path / "tiny.gguf", TinySpec(ctx=1024))
    with pytest.raises(SpeculativeError, match="cannot draft for this model"):
        Engine(smol, n_parallel=2, n_ctx=256, draft_model=tiny)
    with pytest.raises(SpeculativeError, match="not both"):
        Engine(smol, n_parallel=2, n_ctx=256, draft_model=tiny, drafter=NgramDrafter)
