"""Constrained decoding (pyllm/runtime/grammar.py, the sampler's token mask, the step machine):
grammars compile or fail with the parser's message, the mask is exact, and SmolLM2 under a
grammar only ever writes what the grammar allows, in the Python API and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from pyllm import LLM, Grammar, GrammarError, SamplingParams
from pyllm.errors import SamplingError
from pyllm.runtime.grammar import Constraint, from_options, from_response_format
from pyllm.runtime.sampling import Sampler
from tests.test_cli import run_cli

ARITHMETIC = r'''root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [0-9]+'''
# the same language as a Python regular expression (nesting depth is bounded by the length)
_NUM = r"[0-9]+"


def is_arithmetic(text: str) -> bool:
    """A recursive-descent check of ARITHMETIC (the grammar's language, written independently)."""
    pos = 0

    def expr() -> bool:
        nonlocal pos
        if not term():
            return False
        while pos < len(text) and text[pos] in "+-":
            pos += 1
            if not term():
                return False
        return True

    def term() -> bool:
        nonlocal pos
        if not factor():
            return False
        while pos < len(text) and text[pos] in "*/":
            pos += 1
            if not factor():
                return False
        return True

    def factor() -> bool:
        nonlocal pos
        if pos < len(text) and text[pos] == "(":
            pos += 1
            if not expr() or pos >= len(text) or text[pos] != ")":
                return False
            pos += 1
            return True
        m = re.compile(_NUM).match(text, pos)
        if not m:
            return False
        pos = m.end()
        return True

    return expr() and pos == len(text)


@pytest.fixture(scope="module")
def llm(smollm2_path: Path) -> Iterator[LLM]:
    with LLM(smollm2_path, n_ctx=1024) as model:
        yield model


def _bits(allowed: list[int], n: int) -> np.ndarray:
    words = np.zeros((n + 31) // 32, dtype=np.uint32)
    for t in allowed:
        words[t // 32] |= np.uint32(1 << (t % 32))
    return words


# ---- the sampler's mask ----------------------------------------------------------------------

def test_sampler_mask_drops_every_other_token() -> None:
    n = 100
    logits = np.linspace(0.0, 5.0, n, dtype=np.float32)  # token 99 is the most likely
    greedy = Sampler(SamplingParams(temperature=0.0), n)
    assert greedy.sample(logits) == 99  # negative control: unmasked
    assert greedy.sample(logits, _bits([3, 40, 41], n)) == 41
    assert greedy.sample(logits, _bits([0], n)) == 0
    hot = Sampler(SamplingParams(temperature=5.0, top_k=0, top_p=1.0, min_p=0.0, seed=1), n)
    allowed = {7, 33, 64, 65, 95}
    drawn = {hot.sample(logits, _bits(sorted(allowed), n)) for _ in range(400)}
    assert drawn == allowed  # each allowed token is drawn, nothing else ever is
    ids, probs = hot.candidates(logits, _bits(sorted(allowed), n))
    assert set(ids[probs > 0].tolist()) == allowed
    lp = hot.sample_with_logprobs(logits, 3, _bits([5], n))
    assert lp.token == 5 and lp.sampled_logprob == pytest.approx(0.0, abs=1e-6)
    # the raw logprobs stay the model's own (top token 99 even though it was banned)
    assert lp.top_logprobs[0][0] == 99


@pytest.mark.parametrize("density", [0.02, 0.5, 0.98])
def test_sampler_mask_matches_a_reference_at_any_density(density: float) -> None:
    """Every token of a random mask (words all set, all clear and mixed, a partial last word):
    the greedy draw is the best allowed token and the surviving candidates are allowed ones."""
    n = 1000 + 17
    rng = np.random.default_rng(int(density * 100))
    logits = rng.standard_normal(n).astype(np.float32)
    allowed = rng.random(n) < density
    allowed[:64] = True  # two full words
    allowed[64:128] = False
    allowed[int(np.argmax(logits))] = False  # the free choice is banned
    words = np.packbits(np.r_[allowed, np.zeros(-n % 32, bool)], bitorder="little").view(np.uint32)
    greedy = Sampler(SamplingParams(temperature=0.0), n)
    best = int(np.flatnonzero(allowed)[np.argmax(logits[allowed])])
    assert greedy.sample(logits, words) == best
    hot = Sampler(SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, seed=3), n)
    ids, probs = hot.candidates(logits, words)
    kept = set(ids[probs > 0].tolist())
    assert kept == set(np.flatnonzero(allowed).tolist())


def test_sampler_mask_checks_its_shape() -> None:
    n = 70
    s = Sampler(SamplingParams(temperature=0.0), n)
    logits = np.zeros(n, dtype=np.float32)
    with pytest.raises(SamplingError, match="allows no token"):
        s.sample(logits, np.zeros(3, dtype=np.uint32))
    with pytest.raises(SamplingError, match="has 2 words, n_vocab 70 needs 3"):
        s.sample(logits, np.full(2, 0xFFFFFFFF, dtype=np.uint32))
    with pytest.raises(SamplingError, match="uint32"):
        s.sample(logits, np.ones(3, dtype=np.float32))
    with pytest.raises(SamplingError, match="uint32"):
        s.sample(logits, np.ones((3, 1), dtype=np.uint32))
    # bits beyond n_vocab are ignored: only token 69 of the last word is real
    assert s.sample(logits, np.array([0, 0, 0xFFFFFFE0], dtype=np.uint32)) == 69


# ---- grammars: compile or fail with the parser's message ------------------------------------

@pytest.mark.parametrize(("grammar", "message"), [
    (Grammar.gbnf('root ::= "a" foo'), r"invalid GBNF grammar: Rule 'foo' not found"),
    (Grammar.gbnf('root ::= "a" [b-'), r"invalid GBNF grammar: Unexpected end of input at line 1"),
    (Grammar.gbnf('root ::= ('), r"Expected '\)' at line 1"),
    (Grammar.regex("a(b"), r"invalid regular expression: unclosed group at position 2 in regex "
                           r"'a\(b'"),
    (Grammar.lark('start: "a" foo'), r'invalid Lark grammar: at 1\(8\): unknown name: "foo"'),
    (Grammar.json_schema({"type": "array", "uniqueItems": True}),
     r'JSON schema keyword\(s\) not supported: \["uniqueItems"\]'),
    (Grammar.json_schema({"type": "object", "if": {}, "then": {}}),
     r'not supported: \["if", "then"\]'),
    (Grammar.json_schema({"type": "string", "pattern": "[a-"}),
     r"unclosed character class at position 1 in regex '\[a-'"),
    (Grammar.json_schema({"type": "strin"}), r"invalid JSON schema: Invalid type: strin"),
])
def test_invalid_grammars_quote_the_parser(grammar: Grammar, message: str) -> None:
    with pytest.raises(GrammarError, match=message) as info:
        grammar.check()
    assert "\n" not in str(info.value)  # one line, for the CLI and HTTP errors


def test_grammar_inputs_are_checked() -> None:
    with pytest.raises(GrammarError, match="not valid JSON: Expecting value at line 1 column 10"):
        Grammar.json_schema('{"type": ')
    with pytest.raises(GrammarError, match="must be an object"):
        Grammar.json_schema("[1, 2]")
    with pytest.raises(GrammarError, match="give one of grammar, json_schema and regex"):
        from_options(grammar='root ::= "a"', regex="a")
    with pytest.raises(GrammarError, match="pyllm.Grammar or GBNF text, not int"):
        from_options(grammar=3)  # type: ignore[arg-type]
    with pytest.raises(GrammarError, match="kind must be one of"):
        Grammar("ebnf", "x")  # type: ignore[arg-type]
    with pytest.raises(GrammarError, match="larger than 1 MiB"):
        Grammar.regex("a" * (1 << 20 + 1))
    assert from_options() is None
    assert from_options(grammar='root ::= "a"') == Grammar.gbnf('root ::= "a"')
    assert from_options(json_schema='{"type": "integer"}') == Grammar.json_schema(
        {"type": "integer"})


def test_response_format_shapes() -> None:
    assert from_response_format(None) is None
    assert from_response_format({"type": "text"}) is None
    assert from_response_format({"type": "json_object"}) == Grammar.json_object()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert from_response_format({"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema, "strict": True}}) == Grammar.json_schema(schema)
    assert from_response_format({"type": "json_object", "schema": schema}) == \
        Grammar.json_schema(schema)
    with pytest.raises(GrammarError, match="needs \"json_schema\""):
        from_response_format({"type": "json_schema"})
    with pytest.raises(GrammarError, match="text, json_object or json_schema, got 'xml'"):
        from_response_format({"type": "xml"})


def test_missing_llguidance_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyllm.runtime.grammar as g

    monkeypatch.setitem(sys.modules, "llguidance", None)  # import fails
    g._compile.cache_clear()
    with pytest.raises(GrammarError, match=r'needs the llguidance package: pip install '
                                           r'"pyllm\[grammar\]"'):
        Grammar.regex("x+").check()
    g._compile.cache_clear()


# ---- the matcher over a real vocabulary ------------------------------------------------------

def test_constraint_mask_is_exactly_the_grammars_next_tokens(llm: LLM) -> None:
    tok = llm.tokenizer
    c = Constraint(Grammar.gbnf('root ::= "yes" | "no"'), tok, llm.n_vocab, prefetch=False)
    allowed = np.nonzero(np.unpackbits(c.mask().view(np.uint8), bitorder="little"))[0]
    pieces = {tok.token_to_bytes(int(t)) for t in allowed}
    # every allowed token is a non-empty prefix of "yes" or "no"; and those prefixes that are
    # single tokens are all allowed
    assert all(p and (b"yes".startswith(p) or b"no".startswith(p)) for p in pieces)
    assert {b"yes", b"no", b"y", b"n"} <= pieces
    assert not c.finished and not c.accepting
    c.accept(tok.token_to_id("yes"))
    assert c.finished and c.accepting
    with pytest.raises(GrammarError, match="did not accept token"):
        Constraint(Grammar.gbnf('root ::= "yes"'), tok, llm.n_vocab,
                   prefetch=False).accept(tok.token_to_id("no"))


def test_control_tokens_are_never_text_under_a_grammar(llm: LLM) -> None:
    tok = llm.tokenizer
    im_start = tok.token_to_id("<|im_start|>")
    c = Constraint(Grammar.regex(".*"), tok, llm.n_vocab, prefetch=False)
    words = c.mask()
    assert not (words[im_start // 32] >> (im_start % 32)) & 1
    # ... while a Lark grammar may name one as a special token
    c = Constraint(Grammar.lark("start: <|im_start|>"), tok, llm.n_vocab, prefetch=False)
    allowed = np.nonzero(np.unpackbits(c.mask().view(np.uint8), bitorder="little"))[0]
    assert allowed.tolist() == [im_start]


# ---- generation under a grammar (SmolLM2) ---------------------------------------------------

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["ok", "code"]},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_json_schema_output_validates(llm: LLM, schema: dict[str, Any]) -> None:
    for seed in range(3):
        out = llm.create_chat_completion([{"role": "user", "content": "Reply with JSON."}],
                                         max_tokens=200, temperature=1.0, seed=seed,
                                         json_schema=schema)["choices"][0]
        assert out["finish_reason"] == "stop"
        jsonschema.validate(json.loads(out["message"]["content"]), schema)


def test_objects_without_additional_properties_are_closed() -> None:
    from pyllm.runtime.grammar import closed_objects

    schema = {"type": "object", "properties": {
        "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},
        "open": {"type": "object", "properties": {}, "additionalProperties": True},
        "list": {"type": "array", "items": {"properties": {"y": {}}}},
        "alt": {"anyOf": [{"properties": {"z": {}}}, {"type": "string"}]}},
        "$defs": {"d": {"properties": {"w": {}}, "patternProperties": {"^a": {}}}}}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    props = closed["properties"]
    # a property *named* "properties" is a subschema, not a keyword: closed, not polluted
    assert set(props) == {"properties", "open", "list", "alt"}
    assert props["properties"]["additionalProperties"] is False
    assert props["open"]["additionalProperties"] is True
    assert props["list"]["items"]["additionalProperties"] is False
    assert props["alt"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in props["alt"]["anyOf"][1]
    assert "additionalProperties" not in closed["$defs"]["d"]  # patternProperties decides
    assert "additionalProperties" not in schema  # the caller's schema is not changed


def test_arithmetic_grammar_only_yields_expressions(llm: LLM) -> None:
    outs = [llm.generate("A sum: ", max_tokens=24, temperature=1.2, seed=s, grammar=ARITHMETIC)
            for s in range(6)]
    for out in outs:
        # a generation cut by max_tokens may be an unfinished expression: then it is a prefix
        # of one, which completing with digits/parens must be able to close
        done = is_arithmetic(out)
        assert done or is_arithmetic(out + "1" + ")" * out.count("(")) or \
            is_arithmetic(out + ")" * out.count("(")), out
    assert len(set(outs)) > 1
    # negative control: the checker refuses what the unconstrained model writes
    free = llm.generate("A sum: ", max_tokens=24, temperature=1.2, seed=0)
    assert not is_arithmetic(free)


def test_finished_grammar_ends_with_stop_and_length_when_cut(llm: LLM) -> None:
    from pyllm.runtime.completions import make_generation
    from pyllm.runtime.generation import prompt_tokens

    ids = prompt_tokens(llm, "Phone: ")
    gen = make_generation(llm, ids, max_tokens=40, stop=None, temperature=0.0,
                          regex=r"\(\d{3}\) \d{3}-\d{4}")
    text = "".join(p.text for p in gen)
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", text) and gen.finish_reason == "stop"
    gen = make_generation(llm, ids, max_tokens=3, stop=None, temperature=0.0,
                          regex=r"\(\d{3}\) \d{3}-\d{4}")
    text = "".join(p.text for p in gen)
    assert gen.finish_reason == "length" and len(gen.tokens) == 3
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", text) is None and text.startswith("(")


def test_prefetched_and_inline_masks_give_the_same_text(llm: LLM, monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    import pyllm.runtime.completions as completions

    schema = SCHEMAS[0]
    kw: dict[str, Any] = {"max_tokens": 60, "temperature": 0.9, "seed": 11, "json_schema": schema}
    messages = [{"role": "user", "content": "A person as JSON."}]
    prefetched = llm.chat(messages, **kw)

    def inline(llm_: Any, grammar: Grammar | None) -> Any:
        assert grammar is not None
        return Constraint(grammar, llm_.tokenizer, llm_.n_vocab, prefetch=False)

    monkeypatch.setattr(completions, "constraint_of", inline)
    assert llm.chat(messages, **kw) == prefetched


def test_create_chat_completion_response_format(llm: LLM) -> None:
    ask = [{"role": "user", "content": "Describe a cat as a JSON object."}]
    out = llm.create_chat_completion(ask, response_format={"type": "json_object"}, max_tokens=300,
                                     temperature=0.5, seed=0)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(out["choices"][0]["message"]["content"]), dict)
    with pytest.raises(GrammarError, match="not both"):
        llm.create_chat_completion([{"role": "user", "content": "x"}], regex="a",
                                   response_format={"type": "json_object"})


# ---- the CLI --------------------------------------------------------------------------------

def _pyllm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # outside the checkout (tests.test_cli.run_cli): the source tree has no compiled extension
    return run_cli(*args, timeout=300, stdin=stdin)


def test_cli_run_grammar_flags(smollm2_path: Path, tmp_path: Path) -> None:
    r = _pyllm("run", "-m", str(smollm2_path), "-p", "Yes or no?", "--temp", "0",
               "--grammar", 'root ::= "yes" | "no"')
    assert r.returncode == 0, r.stderr
    assert r.stdout.removeprefix("Yes or no?").strip() in ("yes", "no")
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMAS[1]))
    r = _pyllm("run", "-m", str(smollm2_path), "-p", "Colours:", "--temp", "0", "-jf",
               str(schema))
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout.removeprefix("Colours:")), SCHEMAS[1])
    gbnf = tmp_path / "g.gbnf"
    gbnf.write_text(ARITHMETIC)
    r = _pyllm("run", "-m", str(smollm2_path), "-p", "1+1=", "-n", "8", "--grammar-file",
               str(gbnf))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(("flags", "code", "message"), [
    (["--grammar", "root ::= foo"], 2, "error: invalid GBNF grammar: Rule 'foo' not found"),
    (["-j", '{"type": "array", "uniqueItems": true}'], 2,
     'error: invalid JSON schema: JSON schema keyword(s) not supported: ["uniqueItems"]'),
    (["--regex", "a(b"], 2, "error: invalid regular expression: unclosed group at position 2"),
    (["-j", "{"], 2, "error: the JSON schema is not valid JSON"),
    (["--grammar-file", "/nonexistent/g.gbnf"], 1, "error: cannot read grammar file"),
    (["--grammar", "root ::= \"a\"", "--regex", "a"], 2, "not allowed with argument"),
])
def test_cli_bad_grammar_is_one_error_line(flags: list[str], code: int, message: str) -> None:
    # checked before the model loads: no model needed
    r = _pyllm("run", "-m", "/nonexistent.gguf", "-p", "x", *flags)
    assert r.returncode == code
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_cli_chat_replies_follow_the_grammar(smollm2_path: Path) -> None:
    r = _pyllm("chat", "-m", str(smollm2_path), "-j", '{"enum": ["red", "green", "blue"]}',
               "--temp", "0.9", "--seed", "4", stdin="Pick a colour\nAnd another one\n/exit\n")
    assert r.returncode == 0, r.stderr
    replies = [line.removeprefix("> ").strip() for line in r.stdout.splitlines()[1:]]
    replies = [x for x in replies if x]
    assert len(replies) == 2 and all(x in ('"red"', '"green"', '"blue"') for x in replies), \
        r.stdout


def test_a_failed_prefetch_is_raised_by_the_next_mask(llm: LLM) -> None:
    """The helper thread's error reaches the generation's thread (and the helper lives on)."""
    tok = llm.tokenizer
    c = Constraint(Grammar.regex("[a-z]+"), tok, llm.n_vocab)
    c.mask()

    def broken() -> None:
        raise RuntimeError("boom")

    c._fill = broken  # type: ignore[method-assign]
    c.accept(tok.token_to_id("a"))
    with pytest.raises(GrammarError, match="could not be computed: boom"):
        c.mask()
    ok = Constraint(Grammar.regex("[a-z]+"), tok, llm.n_vocab)
    ok.accept(tok.token_to_id("a"))
    assert ok.mask().any()  # the helper still computes masks
