"""Constrained decoding: what a generation must match (a grammar), and the per-sequence matcher
that turns it into the set of allowed next tokens.

    Grammar.gbnf('root ::= "yes" | "no"')         # llama.cpp's GBNF
    Grammar.json_schema({"type": "object", ...})  # JSON that validates against a schema
    Grammar.regex(r"\\d{3}-\\d{4}")                # a regular expression
    Grammar.lark(...)                              # llguidance's Lark dialect (tool calls use it)

The engine is ``llguidance`` (the Rust core behind llama.cpp's and vLLM's structured output): an
Earley parser over a lexer whose token masks are computed from a trie of the vocabulary in
tens of microseconds. It is an optional dependency (``pip install "pyllm[grammar]"``); without it
a constrained request raises :class:`~pyllm.errors.GrammarError` saying what to install, and
nothing else in pyllm imports it.

A grammar is checked and compiled once per distinct source (cached); a :class:`Constraint` is one
sequence's matcher. Per generated token the step machine (:mod:`pyllm.runtime.steps`) asks for
the mask of allowed tokens, the C++ sampler drops the others before its chain, and the token
drawn advances the matcher. The next mask is computed on a helper thread while the caller runs
the model's forward (both release the GIL), so the mask costs the decode loop little.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from pyllm.errors import GrammarError

if TYPE_CHECKING:
    import numpy as np

    from pyllm.tokenizer import Tokenizer

GrammarKind = Literal["gbnf", "lark", "json_schema", "regex"]
KINDS: tuple[GrammarKind, ...] = ("gbnf", "lark", "json_schema", "regex")

INSTALL_HINT = 'pip install "pyllm[grammar]" (or: pip install llguidance)'

# JSON as the constrained model writes it: one line, ", " and ": " between items, no free
# whitespace. Free whitespace lets a small model emit newlines until max_tokens and end with
# incomplete JSON; the fixed separators keep it readable. A schema's own "x-guidance" settings
# override these defaults.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ",
                                "key_separator": ": "}
MAX_SOURCE_BYTES = 1 << 20  # a grammar, schema or pattern larger than 1 MiB is refused


def llguidance() -> Any:
    """The llguidance module, or GrammarError naming what to install."""
    try:
        import llguidance as llg
    except ImportError:
        raise GrammarError(f"structured output (grammar, json_schema, regex, tools) needs the "
                           f"llguidance package: {INSTALL_HINT}") from None
    return llg


@dataclass(frozen=True)
class Grammar:
    """What a generation must match. ``kind`` is one of :data:`KINDS`; ``source`` is the grammar
    text, the regular expression, or the JSON schema serialized as JSON."""

    kind: GrammarKind
    source: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"grammar kind must be one of {', '.join(KINDS)}, "
                               f"got {self.kind!r}")
        if not isinstance(self.source, str):
            raise GrammarError(f"a {self.kind} grammar must be text, "
                               f"not {type(self.source).__name__}")
        if len(self.source.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
            raise GrammarError(f"the {_NAMES[self.kind]} is larger than "
                               f"{MAX_SOURCE_BYTES >> 20} MiB")

    @classmethod
    def gbnf(cls, text: str) -> Grammar:
        """A grammar in llama.cpp's GBNF (``root ::= ...``); the start rule is ``root``.

        Args:
            text: The GBNF source.

        Returns:
            The grammar (compiled on first use).
        """
        return cls("gbnf", text)

    @classmethod
    def lark(cls, text: str) -> Grammar:
        """A grammar in llguidance's Lark dialect (``start: ...``, ``%json {...}`` inline).

        Args:
            text: The Lark source.

        Returns:
            The grammar (compiled on first use).
        """
        return cls("lark", text)

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        """The whole output matches ``pattern`` (Rust regex syntax, no look-around).

        Args:
            pattern: The regular expression.

        Returns:
            The grammar (compiled on first use).
        """
        return cls("regex", pattern)

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | str) -> Grammar:
        """JSON that validates against ``schema`` (a dict, or its JSON text). Objects that list
        ``properties`` get only those keys unless the schema allows others explicitly (see
        :func:`closed_objects`).

        Args:
            schema: A JSON schema: a dict, a bool, or its JSON text.

        Returns:
            The grammar (compiled on first use).
        """
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e.msg} at line "
                                   f"{e.lineno} column {e.colno}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON schema must be an object (or true), "
                               f"not {type(schema).__name__}")
        try:
            text = json.dumps(closed_objects(schema), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise GrammarError(f"the JSON schema cannot be serialized as JSON: {e}") from None
        return cls("json_schema", text)

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``).

        Returns:
            The grammar.
        """
        return cls.json_schema({"type": "object"})

    def compiled(self) -> str:
        """The llguidance grammar, checked (GrammarError quoting the parser's message).

        Returns:
            The grammar in llguidance's serialized form.
        """
        return _compile(self.kind, self.source)

    def check(self) -> Grammar:
        """Compile now (errors at request time, not at the first token); returns self.

        Returns:
            This grammar, compiled.
        """
        self.compiled()
        return self


# JSON Schema keywords whose value is a subschema, a list of them, or a map of them
_SUBSCHEMA = ("additionalProperties", "items", "not", "contains", "if", "then", "else",
              "propertyNames", "unevaluatedProperties", "unevaluatedItems")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions",
                   "dependentSchemas")


def closed_objects(schema: Any) -> Any:
    """The schema with ``"additionalProperties": false`` on every object schema that lists
    ``properties`` and says nothing about other keys, as llama.cpp's grammars and OpenAI's
    strict mode treat them: every output still validates against the original schema, and a
    model cannot wander into invented keys until its token limit cuts the JSON short."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA:
        if key in out:
            out[key] = closed_objects(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed_objects(s) for k, s in out[key].items()}
    if isinstance(out.get("items"), list):  # draft-4 tuple form
        out["items"] = [closed_objects(s) for s in out["items"]]
    if "properties" in out and not any(k in out for k in (
            "additionalProperties", "patternProperties", "unevaluatedProperties")):
        out["additionalProperties"] = False
    return out


_NAMES = {"gbnf": "GBNF grammar", "lark": "Lark grammar", "json_schema": "JSON schema",
          "regex": "regular expression"}


def from_options(grammar: Grammar | str | None = None,
                 json_schema: dict[str, Any] | bool | str | None = None,
                 regex: str | None = None) -> Grammar | None:
    """The one constraint of a call given as ``grammar=`` (a Grammar or GBNF text),
    ``json_schema=`` or ``regex=``; None when none is given. Giving two is an error."""
    given = [name for name, v in (("grammar", grammar), ("json_schema", json_schema),
                                  ("regex", regex)) if v is not None]
    if len(given) > 1:
        raise GrammarError(f"give one of grammar, json_schema and regex, not {' and '.join(given)}")
    if grammar is not None:
        if isinstance(grammar, Grammar):
            return grammar
        if not isinstance(grammar, str):
            raise GrammarError(f"grammar must be a pyllm.Grammar or GBNF text, "
                               f"not {type(grammar).__name__}")
        return Grammar.gbnf(grammar)
    if json_schema is not None:
        return Grammar.json_schema(json_schema)
    if regex is not None:
        if not isinstance(regex, str):
            raise GrammarError(f"regex must be a string, not {type(regex).__name__}")
        return Grammar.regex(regex)
    return None


def from_response_format(fmt: Mapping[str, Any] | None) -> Grammar | None:
    """OpenAI's ``response_format``: ``{"type": "text"}`` (None), ``{"type": "json_object"}``
    (any object; llama.cpp's ``"schema"`` key narrows it), ``{"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``."""
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping):
        raise GrammarError(f"response_format must be an object, not {type(fmt).__name__}")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = fmt.get("schema")
        return Grammar.json_object() if schema is None else Grammar.json_schema(schema)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, Mapping) or spec.get("schema") is None:
            raise GrammarError('response_format {"type": "json_schema"} needs "json_schema": '
                               '{"name": ..., "schema": {...}}')
        return Grammar.json_schema(spec["schema"])
    raise GrammarError(f"response_format type must be text, json_object or json_schema, "
                       f"got {kind!r}")


@lru_cache(maxsize=64)
def _compile(kind: GrammarKind, source: str) -> str:
    llg = llguidance()
    what = _NAMES[kind]
    if kind == "gbnf":
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            lark = gbnf_to_lark(source)
        except Exception as e:  # the converter raises plain Exceptions with a position
            raise GrammarError(f"invalid {what}: {e}") from None
        grammar = llg.LLMatcher.grammar_from_lark(lark)
    elif kind == "lark":
        grammar = llg.LLMatcher.grammar_from_lark(source)
    elif kind == "regex":
        grammar = llg.LLMatcher.grammar_from_regex(source)
    else:
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(source, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(f"invalid {what}: {e}") from None
    error = llg.LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise GrammarError(f"invalid {what}: {_reword(error)}")
    return str(grammar)


_SOURCE_ECHO = re.compile(r"^\s*\d+ \| ")  # llguidance quotes the grammar line under its error
_CARET = re.compile(r"^(\s*)\^+\s*$")


def _reword(message: str) -> str:
    """llguidance's message on one line (CLI errors are one line; HTTP errors one string):
    a regex error as "what at position N of 'pattern'", the grammar echo and carets dropped."""
    message = message.strip()
    if message.startswith("Unimplemented keys:"):
        keys = message.split(":", 1)[1].strip()
        return f"JSON schema keyword(s) not supported: {keys}"
    lines = message.splitlines()
    for i, line in enumerate(lines):
        if line.rstrip().endswith("regex parse error:") and i + 2 < len(lines):
            pattern_line, caret = lines[i + 1], _CARET.match(lines[i + 2])
            what = next((ln.split("error:", 1)[1].strip() for ln in lines[i + 2:]
                         if ln.startswith("error:")), "invalid")
            indent = len(pattern_line) - len(pattern_line.lstrip())
            where = f" at position {len(caret.group(1)) - indent + 1}" if caret else ""
            return f"{what}{where} in regex {pattern_line.strip()!r}"
    kept = [ln.strip() for ln in lines if ln.strip() and not _SOURCE_ECHO.match(ln)
            and not _CARET.match(ln)]
    return " ".join(kept)


# ---- the vocabulary as llguidance sees it ----------------------------------------------------

class _VocabView:
    """The attributes llguidance's TokenizerWrapper reads: each token's bytes (control tokens
    as 0xFF + their text, so grammars can name them as ``<|im_end|>`` but text never produces
    them), BOS/EOS, and a text encoder (strings only: llguidance then tokenizes the valid UTF-8
    prefix itself)."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int) -> None:
        from pyllm.tokenizer.vocab import TokenType

        vocab = tokenizer.vocab
        tokens: list[bytes] = []
        special: list[int] = []
        # one pass over the vocabulary (a byte-level one reads each text from its file)
        pieces = tokenizer.token_pieces(special=False)
        for i, (ttype, text) in enumerate(zip(vocab.types, list(vocab.tokens), strict=True)):
            looks_special = ttype == TokenType.USER_DEFINED and text.startswith("<") \
                and text.endswith(">") and len(text) > 2
            if ttype == TokenType.CONTROL or looks_special:
                tokens.append(b"\xff" + text.encode("utf-8"))
                special.append(i)
            else:
                tokens.append(pieces[i])
        tokens += [b""] * (n_vocab - len(tokens))  # output rows beyond the vocabulary
        self.tokens = tokens
        self.special_token_ids = special
        self.bos_token_id = tokenizer.bos_id
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text only")  # tells llguidance to pass str
        return self._tokenizer.encode_continuation(text)


_lltok_cache: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()
_lltok_lock = threading.Lock()


def end_tokens(tokenizer: Tokenizer) -> list[int]:
    """EOS and the end-of-turn tokens: what a finished grammar lets the model emit."""
    ids = [tokenizer.eos_id] if tokenizer.eos_id is not None and tokenizer.eos_id >= 0 else []
    return list(dict.fromkeys(ids + list(tokenizer.eot_ids)))


def lltokenizer(tokenizer: Tokenizer, n_vocab: int | None = None) -> Any:
    """The llguidance tokenizer of a vocabulary (built once per tokenizer and size: ~0.15 s
    for 49k tokens)."""
    llg = llguidance()
    n = tokenizer.n_vocab if n_vocab is None else max(n_vocab, tokenizer.n_vocab)
    with _lltok_lock:
        per = _lltok_cache.setdefault(tokenizer, {})
        if n not in per:
            ends = end_tokens(tokenizer) or [0]
            per[n] = llg.LLTokenizer(llg.TokenizerWrapper(_VocabView(tokenizer, n)),
                                     n_vocab=n, eos_token=ends)
        return per[n]


# ---- one sequence's matcher -----------------------------------------------------------------

class _MaskWorker:
    """One daemon thread that computes masks while the caller runs the forward. The handoff is
    a C-level queue and the sequence's lock (released when the mask is written): a
    ThreadPoolExecutor's futures cost several times more per token than the mask itself."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="pyllm-grammar", daemon=True).start()

    def _run(self) -> None:
        while True:
            fill, done = self._jobs.get()
            try:
                fill()  # Constraint._prefetched: keeps its own error for the waiter
            finally:
                done.release()

    def submit(self, fill: Any, done: Any) -> None:
        """Run ``fill``; ``done`` (a free lock) is held until it has run."""
        done.acquire()
        self._jobs.put((fill, done))


_worker: _MaskWorker | None = None
_worker_lock = threading.Lock()


def _mask_worker() -> _MaskWorker:
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = _MaskWorker()
        return _worker


class Constraint:
    """One sequence's position in a grammar: the mask of allowed next tokens (one bit per token,
    uint32 words, as the sampler takes it) and the tokens accepted so far.

    ``prefetch=True`` computes the next mask on a helper thread as soon as a token is accepted,
    so it overlaps the forward pass that follows; :meth:`mask` waits for it.
    """

    def __init__(self, grammar: Grammar, tokenizer: Tokenizer, n_vocab: int, *,
                 prefetch: bool = True) -> None:
        llg = llguidance()
        compiled = grammar.compiled()
        self.grammar = grammar
        self.n_vocab = n_vocab
        self._matcher = llg.LLMatcher(lltokenizer(tokenizer, n_vocab), compiled, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(f"invalid {_NAMES[grammar.kind]}: "
                               f"{_reword(self._matcher.get_error())}")
        import numpy as np  # (imported with a constraint, not with this module)

        self._words = np.zeros((n_vocab + 31) // 32, dtype=np.uint32)
        # the lock of a mask being computed, released by the helper when done: one per
        # sequence (not one per token), taken again by submit, handed back by _wait
        self._done = threading.Lock()
        self._pending = False
        self._worker = _mask_worker() if prefetch else None
        self._error: Exception | None = None
        self._fresh = False
        self._finished = bool(self._matcher.is_stopped())

    def _fill(self) -> None:
        # writes the mask straight into our buffer; releases the GIL while it works
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)

    def _wait(self) -> None:
        """Until the mask being computed (if any) is written."""
        if self._pending:
            self._done.acquire()
            self._done.release()
            self._pending = False

    def mask(self) -> np.ndarray:
        """The allowed next tokens as bits (token t allowed iff bit t % 32 of word t // 32)."""
        if self._pending:
            self._wait()
            if self._error is not None:  # the helper's attempt failed: raise it here
                error, self._error = self._error, None
                raise GrammarError(f"the grammar's next tokens could not be computed: "
                                   f"{error}") from error
        elif not self._fresh:
            self._fill()
        self._fresh = True
        return self._words

    def _prefetched(self) -> None:
        """The helper thread's job: the mask, or the error for :meth:`mask` to raise."""
        try:
            self._fill()
        except Exception as e:  # noqa: BLE001 - handed to the caller's thread
            self._error = e

    def accept(self, token: int) -> None:
        """Advance past a sampled token (which the mask allowed)."""
        self._wait()  # a mask nobody asked for: finish it before moving on
        self._fresh = False
        if not self._matcher.consume_token(int(token)):
            raise GrammarError(f"the grammar did not accept token {token}: "
                               f"{self._matcher.get_error()}")
        # read before the helper thread holds the matcher (it is not shared while computing)
        self._finished = bool(self._matcher.is_stopped())
        if self._worker is not None and not self._finished:
            self._worker.submit(self._prefetched, self._done)
            self._pending = True

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (only an end token)."""
        return self._finished

    @property
    def accepting(self) -> bool:
        """The output so far is a complete match (it may still go on)."""
        self.close()
        return bool(self._matcher.is_accepting())

    def close(self) -> None:
        """Wait for a mask still being computed (the buffer must outlive it)."""
        self._wait()

    def __del__(self) -> None:
        if getattr(self, "_pending", False):
            self._wait()


__all__ = ["INSTALL_HINT", "JSON_OPTIONS", "KINDS", "Constraint", "Grammar", "closed_objects",
           "end_tokens",
           "from_options", "from_response_format", "llguidance", "lltokenizer"]
