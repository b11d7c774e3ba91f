"""The sampler chain against a numpy reference, distribution (chi-square) tests, mirostat,
penalties, reproducibility and parameter validation."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle

import numpy as np
import pytest

from pyllm import _core  # noqa: F401  (a missing extension must fail the run, not skip it)
from pyllm.errors import SamplingError
from pyllm.runtime.sampling import Sampler, SamplingParams, raw_logprobs

# Everything off: each test switches on the stage it checks.
OFF = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, tfs_z=1.0)


# ---------------------------------------------------------------------------------------------
# numpy reference of llama.cpp's chain (float64), written from the published semantics
# ---------------------------------------------------------------------------------------------

def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_modified_logits(logits: np.ndarray, p: SamplingParams, history: list[int]) -> np.ndarray:
    x = logits.astype(np.float64).copy()
    for tok, b in p.logit_bias.items():
        x[tok] += b
    n = p.repeat_last_n
    window = [] if n == 0 else (history if n < 0 else history[-n:])
    for tok in set(window):
        c = window.count(tok)
        x[tok] = x[tok] * p.repeat_penalty if x[tok] <= 0 else x[tok] / p.repeat_penalty
        x[tok] -= c * p.frequency_penalty + p.presence_penalty
    return x


def _order(ids: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ids sorted by logit descending, ties by lower id."""
    return ids[np.lexsort((ids, -x[ids]))]


def ref_chain(logits: np.ndarray, p: SamplingParams, history: list[int] = ()) -> dict[int, float]:
    """Final candidate -> probability map of the non-mirostat chain."""
    x = ref_modified_logits(logits, p, list(history))
    if p.temperature == 0:
        return {int(np.argmax(x)): 1.0}
    ids = _order(np.arange(x.size), x)
    if 0 < p.top_k < ids.size:
        ids = ids[: p.top_k]
    if p.tfs_z < 1 and ids.size > 2:
        ids = _order(ids, x)
        q = _softmax(x[ids])
        d2 = np.abs(np.diff(q, 2))
        d2 = d2 / d2.sum() if d2.sum() > 1e-6 else np.full(d2.size, 1 / d2.size)
        cum = np.cumsum(d2)
        cut = [i for i in range(d2.size) if cum[i] > p.tfs_z and i >= 1]
        if cut:
            ids = ids[: cut[0]]
    if p.typical_p < 1:
        q = _softmax(x[ids])
        h = -(q * np.log(q)).sum()
        score = np.abs(-np.log(q) - h)
        order = np.lexsort((ids, -x[ids], score))
        cum = np.cumsum(q[order])
        last = int(np.argmax(cum > p.typical_p)) + 1 if (cum > p.typical_p).any() else ids.size
        ids = ids[order[:last]]
    if p.top_p < 1:
        ids = _order(ids, x)
        cum = np.cumsum(_softmax(x[ids]))
        last = int(np.argmax(cum >= p.top_p)) + 1 if (cum >= p.top_p).any() else ids.size
        ids = ids[:last]
    if p.min_p > 0:
        ids = ids[x[ids] >= x[ids].max() + math.log(p.min_p)]
    q = _softmax(x[ids] / p.temperature)
    return {int(i): float(v) for i, v in zip(ids, q, strict=True)}


def core_chain(s: Sampler, logits: np.ndarray) -> dict[int, float]:
    ids, probs = s.candidates(logits)
    assert np.all(np.diff(probs) <= 0), "candidates come most probable first"
    return {int(i): float(v) for i, v in zip(ids, probs, strict=True)}


def assert_same_distribution(got: dict[int, float], want: dict[int, float]) -> None:
    assert set(got) == set(want), (sorted(set(got) ^ set(want)), len(got), len(want))
    g = np.array([got[k] for k in sorted(want)])
    w = np.array([want[k] for k in sorted(want)])
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6)


def llm_like_logits(n: int, seed: int, scale: float = 2.5) -> np.ndarray:
    """Peaked logits like a language model's: a heavy head over a broad Gaussian floor."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * scale
    head = rng.choice(n, size=min(n, 30), replace=False)
    x[head] += rng.uniform(4, 12, head.size)
    return x.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# each stage on fixed logits
# ---------------------------------------------------------------------------------------------

STAGES = [
    dict(OFF),
    dict(OFF, temperature=0.6),
    dict(OFF, top_k=7),
    dict(OFF, top_k=1),
    dict(OFF, top_p=0.9),
    dict(OFF, top_p=0.5),
    dict(OFF, min_p=0.05),
    dict(OFF, min_p=0.3),
    dict(OFF, typical_p=0.8),
    dict(OFF, typical_p=0.3),
    dict(OFF, tfs_z=0.95),
    dict(OFF, tfs_z=0.5),
    dict(),  # llama.cpp defaults: top_k 40, top_p 0.95, min_p 0.05, temperature 0.8
    dict(temperature=1.3, top_k=25, tfs_z=0.97, typical_p=0.9, top_p=0.8, min_p=0.02),
]


@pytest.mark.parametrize("cfg", STAGES, ids=[str(c) for c in STAGES])
@pytest.mark.parametrize("n_vocab,seed", [(64, 1), (3000, 2)])
def test_chain_matches_reference(cfg: dict, n_vocab: int, seed: int) -> None:
    logits = llm_like_logits(n_vocab, seed)
    p = SamplingParams(**cfg)
    s = Sampler(p, n_vocab)
    assert_same_distribution(core_chain(s, logits), ref_chain(logits, p))


@pytest.mark.parametrize("cfg", [dict(OFF, top_p=0.95), dict(OFF, typical_p=0.95),
                                 dict(OFF, top_p=0.99, min_p=0.01)])
def test_mass_filters_on_a_flat_large_vocab(cfg: dict) -> None:
    # Flat logits make top-p / typical keep thousands of tokens: the widening partial sort has
    # to go through several rounds and must still cut at exactly the reference position.
    logits = (np.random.default_rng(5).standard_normal(20000) * 0.7).astype(np.float32)
    p = SamplingParams(**cfg)
    got = core_chain(Sampler(p, logits.size), logits)
    want = ref_chain(logits, p)
    assert len(want) > 1000
    assert_same_distribution(got, want)


def test_greedy_is_argmax_with_lowest_id_on_ties() -> None:
    logits = np.zeros(50, np.float32)
    logits[[7, 3, 41]] = 2.0
    s = Sampler(SamplingParams(temperature=0.0, top_k=1, seed=3), 50)
    assert [s.sample(logits) for _ in range(5)] == [3] * 5
    assert_same_distribution(core_chain(s, logits), {3: 1.0})
    # greedy skips the filters: typical-p would drop the argmax here, greedy still returns it
    logits = llm_like_logits(500, 9)
    s = Sampler(SamplingParams(temperature=0.0, typical_p=0.2), 500)
    assert s.sample(logits) == int(np.argmax(logits))


def test_logit_bias_shifts_and_bans() -> None:
    logits = llm_like_logits(200, 3)
    top = int(np.argmax(logits))
    p = SamplingParams(**dict(OFF, top_k=20), logit_bias={top: -math.inf, 5: 3.0, "17": -1.5})
    s = Sampler(p, 200)
    got = core_chain(s, logits)
    assert top not in got
    assert_same_distribution(got, ref_chain(logits, p))
    assert all(s.sample(logits) != top for _ in range(300))
    greedy = Sampler(SamplingParams(temperature=0.0, logit_bias={top: -math.inf}), 200)
    assert greedy.sample(logits) == int(np.argsort(-logits, kind="stable")[1])


def test_every_token_banned_is_an_error() -> None:
    bias = {i: -math.inf for i in range(8)}
    for temp in (0.0, 0.8):
        for miro in (0, 1, 2):
            s = Sampler(SamplingParams(temperature=temp, mirostat=miro, logit_bias=bias), 8)
            with pytest.raises(SamplingError, match="-inf"):
                s.sample(np.ones(8, np.float32))


# ---------------------------------------------------------------------------------------------
# penalties
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    dict(repeat_penalty=1.3, repeat_last_n=4),
    dict(repeat_penalty=0.8, repeat_last_n=64),
    dict(presence_penalty=0.7, frequency_penalty=0.4, repeat_last_n=6),
    dict(repeat_penalty=1.1, presence_penalty=-0.5, frequency_penalty=0.2, repeat_last_n=-1),
    dict(repeat_penalty=2.0, repeat_last_n=0),  # window 0 = off
])
def test_penalties_match_reference(cfg: dict) -> None:
    logits = llm_like_logits(100, 4)
    logits[:10] = [3.0, -2.0, 0.0, 5.0, -0.5, 1.0, 2.0, -4.0, 7.0, 0.25]
    history = [3, 1, 8, 8, 0, 2, 9, 1, 3, 3, 7, 4, 8]
    p = SamplingParams(**dict(OFF, **cfg))
    s = Sampler(p, 100)
    s.accept_many(history[:5])
    for t in history[5:]:
        s.accept(t)
    assert_same_distribution(core_chain(s, logits), ref_chain(logits, p, history))


def test_penalties_see_only_the_last_n_tokens() -> None:
    logits = np.full(10, 0.5, np.float32)
    logits[0] = 1.0  # the favourite, unless penalized
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=100.0, repeat_last_n=3), 10)
    s.accept(0)
    assert s.sample(logits) == 1  # 0 in the window: 1/100 < 0.5, so 1 (lowest tie) wins
    for t in (5, 6, 7):
        s.accept(t)
    assert s.history_size == 3
    assert s.sample(logits) == 0  # 0 slid out of the window
    s.reset()
    assert s.history_size == 0
    whole = Sampler(SamplingParams(temperature=0.0, repeat_penalty=100.0, repeat_last_n=-1), 10)
    whole.accept_many([0] + [5] * 500)
    assert whole.sample(logits) == 1 and whole.history_size == 501


def test_accept_rejects_bad_tokens() -> None:
    s = Sampler(SamplingParams(repeat_penalty=1.1), 10)
    for bad in (-1, 10, 2**40):
        with pytest.raises(SamplingError):
            s.accept(bad)
    with pytest.raises(SamplingError):
        s.accept_many([1, 2, 99])
    with pytest.raises(SamplingError):
        s.accept(1.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# distributions (chi-square)
# ---------------------------------------------------------------------------------------------

# chi-square critical values at significance 0.001, by degrees of freedom (from the chi-square
# quantile function; hard-coded so the test needs no scipy)
CHI2_999 = {3: 16.266, 5: 20.515, 7: 24.322, 9: 27.877, 11: 31.264, 15: 37.697, 19: 43.820,
            24: 51.179, 29: 58.301, 39: 72.055}


def _chi_square(draws: np.ndarray, want: dict[int, float]) -> tuple[float, int]:
    """Statistic and degrees of freedom; categories expected < 5 times are pooled."""
    n = draws.size
    ids = sorted(want, key=lambda k: -want[k])
    counts = {k: 0 for k in ids}
    for t in draws.tolist():
        assert t in counts, f"token {t} is not a surviving candidate"
        counts[t] += 1
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for k in ids:
        if want[k] * n >= 5:
            obs.append(counts[k])
            exp.append(want[k] * n)
        else:
            pool_o += counts[k]
            pool_e += want[k] * n
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    o, e = np.array(obs, float), np.array(exp, float)
    return float(((o - e) ** 2 / e).sum()), len(obs) - 1


@pytest.mark.parametrize("cfg,n_vocab", [
    (dict(OFF, temperature=0.7), 12),
    (dict(OFF, temperature=1.8, top_k=8), 50),
    (dict(), 400),  # defaults: filters then temperature 0.8
    (dict(temperature=1.2, top_k=0, top_p=0.9, min_p=0.01), 200),
])
def test_sampling_follows_softmax_after_filters(cfg: dict, n_vocab: int) -> None:
    logits = llm_like_logits(n_vocab, 11, scale=1.0)
    p = SamplingParams(**cfg, seed=1234)
    want = ref_chain(logits, p)
    s = Sampler(p, n_vocab)
    draws = np.array([s.sample(logits) for _ in range(20000)])
    stat, df = _chi_square(draws, want)
    assert df >= 3
    crit = CHI2_999.get(df) or df + 3.1 * math.sqrt(2 * df)  # normal approximation otherwise
    assert stat < crit, (stat, df, crit)


def test_chi_square_detects_a_wrong_temperature() -> None:
    # The test above must have power: draws at T=0.7 are rejected against softmax(logits/1.0).
    logits = llm_like_logits(12, 11, scale=1.0)
    s = Sampler(SamplingParams(**dict(OFF, temperature=0.7), seed=7), 12)
    draws = np.array([s.sample(logits) for _ in range(20000)])
    stat, df = _chi_square(draws, ref_chain(logits, SamplingParams(**OFF)))
    assert stat > 10 * CHI2_999.get(df, 50.0)


# ---------------------------------------------------------------------------------------------
# reproducibility
# ---------------------------------------------------------------------------------------------

def test_same_seed_same_sequence_and_reset_repeats() -> None:
    logits = llm_like_logits(1000, 6, scale=1.0)
    p = SamplingParams(temperature=1.5, top_k=0, top_p=0.99, min_p=0.0, seed=42)
    a, b = Sampler(p, 1000), Sampler(p, 1000)
    seq_a = [a.sample(logits) for _ in range(200)]
    assert seq_a == [b.sample(logits) for _ in range(200)]
    assert a.seed == 42
    a.reset()
    assert [a.sample(logits) for _ in range(200)] == seq_a
    c = Sampler(SamplingParams(temperature=1.5, top_k=0, top_p=0.99, min_p=0.0, seed=43), 1000)
    assert [c.sample(logits) for _ in range(200)] != seq_a
    r = Sampler(SamplingParams(seed=-1), 1000)
    seeds = {r.seed}
    for _ in range(3):
        r.reset()
        seeds.add(r.seed)
    assert len(seeds) > 1  # -1 draws a fresh random seed


def test_candidates_leave_the_rng_alone() -> None:
    logits = llm_like_logits(300, 8, scale=1.0)
    p = SamplingParams(temperature=1.0, seed=5)
    a, b = Sampler(p, 300), Sampler(p, 300)
    for _ in range(10):
        b.candidates(logits)
    assert [a.sample(logits) for _ in range(50)] == [b.sample(logits) for _ in range(50)]


# ---------------------------------------------------------------------------------------------
# mirostat
# ---------------------------------------------------------------------------------------------

def ref_mirostat_candidates(logits: np.ndarray, p: SamplingParams, mu: float,
                            n_vocab: int) -> dict[int, float]:
    x = logits.astype(np.float64) / p.temperature
    ids = _order(np.arange(x.size), x)
    if p.mirostat == 2:
        q = _softmax(x)
        keep = ids[-np.log2(q[ids]) <= mu]
        keep = keep if keep.size else ids[:1]
        return {int(i): float(v) for i, v in zip(keep, _softmax(x[keep]), strict=True)}
    m = min(100, ids.size)
    t = np.log(np.arange(2, m + 1) / np.arange(1, m))
    b = x[ids[: m - 1]] - x[ids[1:m]]
    s_hat = (t * b).sum() / (t * t).sum()
    eps = s_hat - 1
    k = ((eps * 2.0**mu) / (1 - n_vocab ** (-eps))) ** (1 / s_hat)
    keep = ids[: max(1, min(int(k), ids.size))]
    return {int(i): float(v) for i, v in zip(keep, _softmax(x[keep]), strict=True)}


@pytest.mark.parametrize("version", [1, 2])
def test_mirostat_candidates_and_mu_updates(version: int) -> None:
    n_vocab = 2000
    p = SamplingParams(mirostat=version, mirostat_tau=3.0, mirostat_eta=0.2, temperature=0.9,
                       seed=9)
    s = Sampler(p, n_vocab)
    assert s.mu == pytest.approx(6.0)
    mus = []
    for step in range(60):
        logits = llm_like_logits(n_vocab, 100 + step, scale=1.5)
        mu = s.mu
        got = core_chain(s, logits)
        want = ref_mirostat_candidates(logits, p, mu, n_vocab)
        # the cut may differ by the boundary token where float32 and float64 disagree
        assert len(set(got) ^ set(want)) <= 1
        tok = s.sample(logits)
        assert tok in got
        surprise = -math.log2(got[tok])
        assert s.mu == pytest.approx(mu - p.mirostat_eta * (surprise - p.mirostat_tau),
                                     rel=1e-4, abs=1e-4)
        mus.append(s.mu)
    assert len(set(mus)) > 30  # mu keeps moving
    s.reset()
    assert s.mu == pytest.approx(6.0)


def test_mirostat_v2_tracks_the_target_surprise() -> None:
    # With a stationary distribution, mu adapts until the mean observed surprise is near tau.
    # (the full distribution's entropy must exceed tau, or mu grows without bound)
    n_vocab = 500
    logits = (np.random.default_rng(21).standard_normal(n_vocab) * 1.5).astype(np.float32)
    q = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert -(q * np.log2(q)).sum() > 6.0
    p = SamplingParams(mirostat=2, mirostat_tau=4.0, mirostat_eta=0.1, temperature=1.0, seed=3)
    s = Sampler(p, n_vocab)
    surprises = []
    for _ in range(3000):
        info = s.sample_with_logprobs(logits)
        surprises.append(-info.sampled_logprob / math.log(2))
    assert abs(np.mean(surprises[1000:]) - 4.0) < 0.3


# ---------------------------------------------------------------------------------------------
# logprobs
# ---------------------------------------------------------------------------------------------

def test_logprobs_raw_and_sampled() -> None:
    logits = llm_like_logits(5000, 12)
    x = logits.astype(np.float64)
    lsm = x - (np.log(np.exp(x - x.max()).sum()) + x.max())
    p = SamplingParams(seed=2)
    s = Sampler(p, 5000)
    cands = core_chain(s, logits)
    r = s.sample_with_logprobs(logits, top_n=5)
    assert r.token in cands
    assert r.logprob == pytest.approx(lsm[r.token], abs=1e-4)
    want_top = np.argsort(-lsm, kind="stable")[:5]
    assert [t for t, _ in r.top_logprobs] == want_top.tolist()
    np.testing.assert_allclose([v for _, v in r.top_logprobs], lsm[want_top], atol=1e-4)
    assert r.sampled_logprob == pytest.approx(math.log(cands[r.token]), abs=1e-5)
    want_sampled = sorted(cands, key=lambda k: -cands[k])[:5]
    assert [t for t, _ in r.sampled_top_logprobs] == want_sampled
    lp, top = raw_logprobs(logits, 17, 3)
    assert lp == pytest.approx(lsm[17], abs=1e-4) and len(top) == 3
    g = Sampler(SamplingParams(temperature=0.0), 5000).sample_with_logprobs(logits, 2)
    assert g.sampled_logprob == 0.0 and g.sampled_top_logprobs == [(g.token, 0.0)]


# ---------------------------------------------------------------------------------------------
# inputs and parameters
# ---------------------------------------------------------------------------------------------

def test_logits_inputs() -> None:
    s = Sampler(SamplingParams(temperature=0.0), 6)
    x = np.array([0, 1, 5, 2, 0, 0], np.float32)
    assert s.sample(x) == 2
    assert s.sample(x.astype(np.float64)) == 2  # converted
    assert s.sample(x[None, :]) == 2  # a (1, n_vocab) row
    assert s.sample(np.repeat(x, 2)[::2]) == 2  # strided: made contiguous
    with pytest.raises(SamplingError, match="n_vocab"):
        s.sample(np.zeros(7, np.float32))
    for bad in (np.nan, np.inf):
        y = x.copy()
        y[1] = bad
        with pytest.raises(SamplingError, match="NaN"):
            s.sample(y)
    with pytest.raises(SamplingError):
        s.sample(np.zeros((2, 3), np.float32))
    with pytest.raises(SamplingError):
        s.sample(["a", "b"])


def test_defaults_are_llama_cpp() -> None:
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p, p.tfs_z) == \
        (0.8, 40, 0.95, 0.05, 1.0, 1.0)
    assert (p.repeat_penalty, p.repeat_last_n, p.presence_penalty, p.frequency_penalty) == \
        (1.0, 64, 0.0, 0.0)
    assert (p.mirostat, p.mirostat_tau, p.mirostat_eta, dict(p.logit_bias), p.seed) == \
        (0, 5.0, 0.1, {}, -1)
    assert hash(p) == hash(SamplingParams())
    with pytest.raises(AttributeError):
        p.top_k = 3  # type: ignore[misc]
    q = SamplingParams(logit_bias={"7": -math.inf, 3: 2})
    with pytest.raises(TypeError):
        q.logit_bias[3] = 1.0  # type: ignore[index]
    assert pickle.loads(pickle.dumps(q)) == q and hash(copy.deepcopy(q)) == hash(q)
    assert dataclasses.asdict(q)["logit_bias"] == {7: -math.inf, 3: 2.0}
    assert dataclasses.replace(q, top_k=3).logit_bias == q.logit_bias


@pytest.mark.parametrize("kw,word", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(min_p=-0.01), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(typical_p=0.0), "typical_p"),
    (dict(typical_p=2.0), "typical_p"),
    (dict(tfs_z=0.0), "tfs_z"),
    (dict(tfs_z=1.5), "tfs_z"),
    (dict(repeat_penalty=0.0), "repeat_penalty"),
    (dict(repeat_penalty=math.inf), "repeat_penalty"),
    (dict(repeat_last_n=-2), "repeat_last_n"),
    (dict(presence_penalty=math.inf), "presence_penalty"),
    (dict(frequency_penalty=math.nan), "frequency_penalty"),
    (dict(mirostat=3), "mirostat"),
    (dict(mirostat_tau=0.0), "mirostat_tau"),
    (dict(mirostat_eta=-1.0), "mirostat_eta"),
    (dict(seed=-2), "seed"),
    (dict(seed=2**32), "seed"),
    (dict(logit_bias={1.5: 1.0}), "logit_bias"),
    (dict(logit_bias={"x": 1.0}), "logit_bias"),
    (dict(logit_bias={-3: 1.0}), "logit_bias"),
    (dict(logit_bias={3: math.inf}), "logit_bias"),
    (dict(logit_bias={3: math.nan}), "logit_bias"),
    (dict(logit_bias=[(1, 2.0)]), "logit_bias"),
])
def test_validation_errors(kw: dict, word: str) -> None:
    with pytest.raises(SamplingError, match=word):
        SamplingParams(**kw)


def test_bias_token_outside_vocab_and_bad_vocab() -> None:
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        Sampler(SamplingParams(logit_bias={10: 1.0}), 10)
    with pytest.raises(SamplingError, match="n_vocab"):
        Sampler(SamplingParams(), 0)
    with pytest.raises(SamplingError, match="SamplingParams"):
        Sampler({"temperature": 1.0}, 10)  # type: ignore[arg-type]


def test_from_kwargs() -> None:
    p = SamplingParams.from_kwargs(temp=0.3, top_k=5, repeat_penalty=1.2, mirostat_mode=2,
                                   penalty_last_n=-1, seed=None)
    assert (p.temperature, p.top_k, p.repeat_penalty, p.mirostat, p.repeat_last_n, p.seed) == \
        (0.3, 5, 1.2, 2, -1, -1)
    assert SamplingParams.from_kwargs() == SamplingParams()
    with pytest.raises(SamplingError, match="bogus.*top_kk|top_kk.*bogus"):
        SamplingParams.from_kwargs(top_kk=3, bogus=1)
    with pytest.raises(SamplingError, match="twice"):
        SamplingParams.from_kwargs(temp=0.3, temperature=0.5)
    with pytest.raises(SamplingError, match="top_p"):
        SamplingParams.from_kwargs(top_p=3)


# ---- one source of truth: names, defaults, checks (issue #16) -----------------------------------


def test_one_alias_table_covers_every_front_end() -> None:
    from pyllm.runtime.sampling import field_name

    # llama-cpp-python's keywords, llama.cpp's C names and the CLI's flag names, in one table
    p = SamplingParams.from_kwargs(temp=0.3, mirostat_mode=1, typ_p=0.9, tfs=0.8,
                                   mirostat_lr=0.2, mirostat_ent=4.0, penalty_freq=0.5)
    assert (p.temperature, p.mirostat, p.typical_p, p.tfs_z, p.mirostat_eta, p.mirostat_tau,
            p.frequency_penalty) == (0.3, 1, 0.9, 0.8, 0.2, 4.0, 0.5)
    assert SamplingParams.from_kwargs(typical=0.7).typical_p == 0.7
    # None is "not given", so it never collides with another spelling of the same field
    assert SamplingParams.from_kwargs(temp=None, temperature=0.5).temperature == 0.5
    assert field_name("mirostat_ent") == "mirostat_tau" and field_name("top_k") == "top_k"
    with pytest.raises(SamplingError, match="unknown"):
        field_name("temperatur")


def test_defaults_are_the_dataclass_defaults() -> None:
    from pyllm.runtime.sampling import DEFAULTS

    assert dict(DEFAULTS) == {f.name: getattr(SamplingParams(), f.name)
                              for f in dataclasses.fields(SamplingParams)}
    assert DEFAULTS["temperature"] == 0.8  # llama.cpp's


def test_cli_help_reads_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from pyllm.cli import common
    from pyllm.runtime.sampling import DEFAULTS, field_name

    # a changed default shows up in every sampling flag's help: nothing is written out twice
    changed = {name: f"<{name}>" for name in DEFAULTS}
    monkeypatch.setattr(common, "DEFAULTS", changed)
    parser = argparse.ArgumentParser()
    common.add_sampling_args(parser)
    helps = {a.dest: a.help for a in parser._actions if a.dest != "help"}
    assert len(helps) == 14
    for dest, text in helps.items():
        assert text.endswith(f"(default <{field_name(dest)}>)"), (dest, text)
        assert parser.get_default(dest) is None  # unset flags leave the field to SamplingParams


def test_server_fields_default_to_sampling_params_and_check_there() -> None:
    from pyllm.runtime.sampling import DEFAULTS
    from pyllm.server.schemas import ApiError, ChatCompletionRequest, CompletionRequest

    for fname in DEFAULTS:  # every field can be sent, under its own name
        assert fname in CompletionRequest.model_fields, fname
    assert CompletionRequest(prompt="x").sampling_params() == SamplingParams()
    msgs = [{"role": "user", "content": "hi"}]
    req = ChatCompletionRequest(messages=msgs, mirostat_mode=2, temperature=0.0)
    assert req.sampling_params() == SamplingParams(mirostat=2, temperature=0.0)
    # the values are checked by SamplingParams alone; its refusal names the field (a 400)
    bad = CompletionRequest(prompt="x", temperature=-1)
    with pytest.raises(ApiError) as e:
        bad.sampling_params()
    assert e.value.status == 400 and e.value.body["error"]["param"] == "temperature"
    assert "temperature must be >= 0" in e.value.body["error"]["message"]
    with pytest.raises(ApiError) as e:
        CompletionRequest(prompt="x", logit_bias={"-3": 1.0}).sampling_params()
    assert e.value.body["error"]["param"] == "logit_bias"
