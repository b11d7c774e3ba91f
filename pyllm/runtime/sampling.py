"""Sampling settings and the sampler.

:class:`SamplingParams` holds llama.cpp's sampling knobs with llama.cpp's defaults and validates
them; :class:`Sampler` runs the C++ chain (``pyllm._core.Sampler``) on one row of logits per
token. The chain, in llama.cpp's order:

1. logit bias (``-inf`` bans a token);
2. repetition penalty over the last ``repeat_last_n`` accepted tokens (a positive logit is
   divided by the penalty, a negative one multiplied), then the OpenAI frequency (per
   occurrence) and presence (once) penalties over the same window;
3. ``temperature == 0``: greedy (argmax, ties to the lowest id; the filters are skipped);
   ``mirostat`` 1/2: temperature, then mirostat with target surprise ``mirostat_tau`` and
   learning rate ``mirostat_eta`` (its state mu starts at ``2 * tau`` on every :meth:`reset`);
   otherwise top-k, tail-free (``tfs_z``), typical-p, top-p, min-p, temperature, then a draw
   from the softmax of what is left.

Every filter keeps at least one token. The penalties only see tokens passed to
:meth:`Sampler.accept` (accept the prompt tokens too for llama.cpp's behaviour).

This module is the one source of the sampling settings for every front end: the names and their
other spellings (:data:`ALIASES`, :func:`field_name`), the defaults (the :class:`SamplingParams`
field defaults, read through :data:`DEFAULTS` by the CLI help and the server) and the checks
(``SamplingParams.__post_init__``; the C ABI checks again at its own boundary). The CLI and the
server build one SamplingParams per call and hand that object on.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pyllm.errors import SamplingError

if TYPE_CHECKING:
    import numpy as np

_UINT32_MAX = 2**32 - 1

# Every other spelling of a field, in one table: llama-cpp-python's keywords (temp,
# mirostat_mode), llama.cpp's C/common names (penalty_*, typ_p) and the llama.cpp command-line
# flags the CLI uses (--typical, --tfs, --mirostat-lr, --mirostat-ent; dashes as underscores).
ALIASES: Mapping[str, str] = MappingProxyType({
    "temp": "temperature",
    "mirostat_mode": "mirostat",
    "penalty_repeat": "repeat_penalty",
    "penalty_last_n": "repeat_last_n",
    "penalty_present": "presence_penalty",
    "penalty_freq": "frequency_penalty",
    "typ_p": "typical_p",
    "typical": "typical_p",
    "tfs": "tfs_z",
    "mirostat_lr": "mirostat_eta",
    "mirostat_ent": "mirostat_tau",
})


class InvalidSamplingParam(SamplingError):
    """A SamplingError about one field; ``param`` names it (the server reports it as the
    OpenAI error's ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _bad(param: str, message: str) -> InvalidSamplingParam:
    return InvalidSamplingParam(param, message)


def _number(name: str, value: Any, param: str | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(param or name, f"{name} must be a number, got {value!r}")
    return float(value)


def _integer(name: str, value: Any, param: str | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _bad(param or name, f"{name} must be an integer, got {value!r}")
    return int(value)


def _bias_key(key: Any) -> int:
    # OpenAI sends logit_bias over JSON, where object keys are strings of token ids.
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    if isinstance(key, bool) or not isinstance(key, numbers.Integral):
        raise _bad("logit_bias", f"logit_bias keys must be token ids (ints), got {key!r}")
    return int(key)


class LogitBias(Mapping[int, float]):
    """Read-only token id -> bias mapping (hashable, picklable, deep-copyable)."""

    __slots__ = ("_d",)

    def __init__(self, items: Mapping[int, float] | None = None) -> None:
        self._d: dict[int, float] = dict(items or {})

    def __getitem__(self, key: int) -> float:
        return self._d[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        return hash(frozenset(self._d.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._d) == dict(other)

    def __repr__(self) -> str:
        return repr(self._d)

    def __reduce__(self) -> tuple[Any, ...]:
        return (LogitBias, (self._d,))


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; defaults are llama.cpp's (and defined only here: see DEFAULTS).
    Invalid values raise SamplingError (an InvalidSamplingParam naming the field)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    tfs_z: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    logit_bias: Mapping[int, float] = field(default_factory=LogitBias)
    seed: int = -1

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("temperature", "top_p", "min_p", "typical_p", "tfs_z", "repeat_penalty",
                     "presence_penalty", "frequency_penalty", "mirostat_tau", "mirostat_eta"):
            v = _number(name, getattr(self, name))
            if not math.isfinite(v):
                raise _bad(name, f"{name} must be finite, got {v}")
            put(name, v)
        for name in ("top_k", "repeat_last_n", "mirostat", "seed"):
            put(name, _integer(name, getattr(self, name)))

        if self.temperature < 0:
            raise _bad("temperature",
                       f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise _bad("top_k", f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise _bad("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise _bad("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.typical_p <= 1:
            raise _bad("typical_p", f"typical_p must be in (0, 1], got {self.typical_p}")
        if not 0 < self.tfs_z <= 1:
            raise _bad("tfs_z", f"tfs_z must be in (0, 1], got {self.tfs_z}")
        if self.repeat_penalty <= 0:
            raise _bad("repeat_penalty",
                       f"repeat_penalty must be > 0 (1 = off), got {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise _bad("repeat_last_n",
                       f"repeat_last_n must be >= -1 (-1 = whole history, 0 = off), "
                       f"got {self.repeat_last_n}")
        if self.mirostat not in (0, 1, 2):
            raise _bad("mirostat", f"mirostat must be 0 (off), 1 or 2, got {self.mirostat}")
        if self.mirostat_tau <= 0:
            raise _bad("mirostat_tau", f"mirostat_tau must be > 0, got {self.mirostat_tau}")
        if self.mirostat_eta <= 0:
            raise _bad("mirostat_eta", f"mirostat_eta must be > 0, got {self.mirostat_eta}")
        if not -1 <= self.seed <= _UINT32_MAX:
            raise _bad("seed", f"seed must be -1 (random) or in [0, {_UINT32_MAX}], "
                               f"got {self.seed}")

        bias = self.logit_bias
        if bias is None:
            bias = {}
        if not isinstance(bias, Mapping):
            raise _bad("logit_bias", "logit_bias must be a mapping of token id -> bias")
        clean: dict[int, float] = {}
        for key, value in bias.items():
            tok = _bias_key(key)
            if tok < 0:
                raise _bad("logit_bias", f"logit_bias token id must be >= 0, got {tok}")
            b = _number(f"logit_bias[{tok}]", value, "logit_bias")
            if math.isnan(b) or b == math.inf:
                raise _bad("logit_bias",
                           f"logit_bias[{tok}] must be finite or -inf (ban), got {b}")
            if tok in clean:
                raise _bad("logit_bias", f"logit_bias gives token {tok} twice")
            clean[tok] = b
        put("logit_bias", LogitBias(clean))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SamplingParams:
        """Build from keyword arguments as a generation call receives them.

        Accepts the field names and the aliases in :data:`ALIASES` (``temp``,
        ``mirostat_mode``, llama.cpp's ``penalty_*`` / ``typ_p``, the CLI's flag names);
        ``None`` means "not given" (the default). Unknown names, or one field given under two
        names, raise SamplingError.

        Args:
            **kwargs: Sampling settings under their field names or aliases.

        Returns:
            The validated parameters.

        Raises:
            SamplingError: An unknown name, a duplicate, or a value out of range.
        """
        out: dict[str, Any] = {}
        spelled: dict[str, str] = {}
        unknown: list[str] = []
        for key, value in kwargs.items():
            if value is None:
                continue
            name = ALIASES.get(key, key)
            if name not in _FIELDS:
                unknown.append(key)
                continue
            if name in spelled:
                raise _bad(name, f"{name!r} given twice (as {spelled[name]!r} and {key!r})")
            spelled[name] = key
            out[name] = value
        if unknown:
            raise SamplingError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))} "
                                f"(known: {', '.join(sorted(_FIELDS | set(ALIASES)))})")
        return cls(**out)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def _to_core(self, core: Any) -> Any:
        p = core.SamplerParams()
        for f in fields(self):
            if f.name != "logit_bias":
                setattr(p, f.name, getattr(self, f.name))
        p.logit_bias = sorted(self.logit_bias.items())
        return p


_FIELDS = frozenset(f.name for f in fields(SamplingParams))

# The defaults, read from the dataclass (their one definition) by the CLI help and the server.
DEFAULTS: Mapping[str, Any] = MappingProxyType({
    f.name: f.default if f.default_factory is MISSING else f.default_factory()
    for f in fields(SamplingParams)})


def field_name(name: str) -> str:
    """The SamplingParams field a name (a field name or an alias) stands for; SamplingError
    for a name that is neither."""
    field_ = ALIASES.get(name, name)
    if field_ not in _FIELDS:
        raise SamplingError(f"unknown sampling parameter {name!r}")
    return field_


@dataclass(frozen=True)
class SampleResult:
    """A drawn token with log-probabilities.

    ``logprob`` / ``top_logprobs``: from ``log_softmax`` of the raw logits (what the OpenAI API
    and llama-cpp-python report). ``sampled_logprob`` / ``sampled_top_logprobs``: from the
    distribution the token was actually drawn from (after bias, penalties, filters and
    temperature; greedy gives 0.0 for the single candidate). Top lists are (token id, logprob),
    most probable first.
    """

    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]]
    sampled_logprob: float
    sampled_top_logprobs: list[tuple[int, float]]


def _core() -> Any:
    from pyllm._native import load_core

    return load_core(SamplingError)


def _row(logits: Any) -> Any:
    # float32 contiguous rows pass through without a copy; anything else is converted once.
    # The decode loop's rows are float32 memoryviews (pyllm.runtime.llm): no numpy for them.
    if type(logits) is memoryview and logits.format == "f" and logits.ndim == 1:
        return logits
    import numpy as np

    arr = np.asarray(logits)
    if arr.dtype != np.float32 or not arr.flags.c_contiguous:
        try:
            arr = np.ascontiguousarray(arr, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise SamplingError(f"logits must be numeric: {e}") from None
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    return arr


class Sampler:
    """The sampler chain for one generation stream (not shared between threads at once).

    ``Sampler(params, n_vocab)``; per token: ``token = s.sample(logits)`` then
    ``s.accept(token)``. :meth:`reset` starts a new generation (history cleared, mirostat's mu
    back to ``2 * tau``, RNG re-seeded: with a fixed seed the same stream repeats).
    """

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        if not isinstance(params, SamplingParams):
            raise SamplingError(f"params must be a SamplingParams, got {type(params).__name__}")
        n_vocab = _integer("n_vocab", n_vocab)
        if n_vocab <= 0 or n_vocab > 2**31 - 1:
            raise SamplingError(f"n_vocab must be in [1, 2^31), got {n_vocab}")
        for tok in params.logit_bias:
            if tok >= n_vocab:
                raise _bad("logit_bias",
                           f"logit_bias token {tok} is outside the vocabulary (n_vocab {n_vocab})")
        core = _core()
        self.params = params
        self.n_vocab = n_vocab
        self._s = core.Sampler(params._to_core(core), n_vocab)

    @property
    def seed(self) -> int:
        """The seed in use (drawn at random for seed -1, a new one at each reset)."""
        return int(self._s.seed)

    @property
    def mu(self) -> float:
        """Mirostat's current maximum surprise (2 * tau after a reset)."""
        return float(self._s.mu)

    @property
    def history_size(self) -> int:
        """Tokens the penalties currently look at (0 when the penalties are off)."""
        return int(self._s.history_size)

    def sample(self, logits: Any, mask: np.ndarray | None = None) -> int:
        """Draw a token from one row of n_vocab logits. Does not record it (see accept).

        ``mask`` (constrained decoding): uint32 words, token t allowed iff bit t % 32 of word
        t // 32 is set; the other tokens are dropped before the chain."""
        return int(self._s.sample(_row(logits), mask))

    def sample_with_logprobs(self, logits: Any, top_n: int = 0,
                             mask: np.ndarray | None = None) -> SampleResult:
        """Draw a token and report log-probabilities (see SampleResult); ``mask`` as in
        :meth:`sample` (the raw logprobs are the model's, the sampled ones after the mask)."""
        top_n = _integer("top_n", top_n)
        if top_n < 0:
            raise SamplingError(f"top_n must be >= 0, got {top_n}")
        tok, lp, top, slp, stop = self._s.sample_with_info(_row(logits), top_n, mask)
        return SampleResult(int(tok), float(lp), [(int(i), float(v)) for i, v in top],
                            float(slp), [(int(i), float(v)) for i, v in stop])

    def candidates(self, logits: Any, mask: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Run the chain without drawing: (token ids int32, probabilities float32) of the
        surviving candidates, most probable first. The RNG and mu are not changed."""
        ids, probs = self._s.candidates(_row(logits), mask)
        return ids, probs

    def accept(self, token: int) -> None:
        """Record a token that was kept (it enters the penalty window)."""
        if type(token) is not int:
            token = _integer("token", token)
        if not 0 <= token < self.n_vocab:
            raise SamplingError(
                f"accepted token {token} is outside the vocabulary (n_vocab {self.n_vocab})")
        self._s.accept(token)

    def accept_many(self, tokens: Iterable[int]) -> None:
        """accept() for each token in order (e.g. the prompt)."""
        toks = [_integer("token", t) for t in tokens]
        for t in toks:
            if not 0 <= t < self.n_vocab:
                raise SamplingError(
                    f"accepted token {t} is outside the vocabulary (n_vocab {self.n_vocab})")
        self._s.accept_many(toks)

    def reset(self) -> None:
        """Start a new generation: clear the history, mu = 2 * tau, re-seed the RNG."""
        self._s.reset()


def raw_logprobs(logits: Any, token: int = -1, top_n: int = 0
                 ) -> tuple[float, list[tuple[int, float]]]:
    """log_softmax of a logits row: (logprob of ``token`` (0.0 when token is -1), the ``top_n``
    most probable (id, logprob) pairs)."""
    top_n = _integer("top_n", top_n)
    if top_n < 0:
        raise SamplingError(f"top_n must be >= 0, got {top_n}")
    row = _row(logits)
    token = _integer("token", token)
    if not -1 <= token < row.size:
        raise SamplingError(f"token {token} is outside the logits row ({row.size} entries)")
    lp, top = _core().raw_logprobs(row, token, top_n)
    return float(lp), [(int(i), float(v)) for i, v in top]


__all__ = ["ALIASES", "DEFAULTS", "InvalidSamplingParam", "LogitBias", "SampleResult", "Sampler",
           "SamplingParams", "field_name", "raw_logprobs"]
