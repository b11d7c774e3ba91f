"""OpenAI-shaped completion results (llama-cpp-python compatible) built on
:mod:`pyllm.runtime.generation`.

``create_completion`` / ``create_chat_completion`` return the dicts the OpenAI API returns
(``id``, ``object``, ``created``, ``model``, ``choices`` with ``finish_reason``, ``usage``), or with
``stream=True`` an iterator of chunk dicts, so code written for llama-cpp-python or the OpenAI
client works unchanged. The dicts themselves are built by :mod:`pyllm.runtime.openai_shapes`, as the
server's are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from pyllm.errors import GrammarError, SamplingError
from pyllm.runtime import openai_shapes as shapes
from pyllm.runtime.generation import Generation, Piece, prompt_tokens, stop_token_ids
from pyllm.runtime.grammar import Grammar, from_options, from_response_format
from pyllm.runtime.tool_use import (
    ToolDeltas,
    ToolPlan,
    chat_with_tools,
    reply_fields,
    reply_grammar,
)

if TYPE_CHECKING:
    from pyllm.runtime.grammar import Constraint
    from pyllm.runtime.llm import LLM
    from pyllm.runtime.sampling import SamplingParams
    from pyllm.runtime.speculative import Drafter


def _stop_list(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not all(isinstance(s, str) for s in stop):
        raise SamplingError("stop must be a string or a list of strings")
    return list(stop)


def generation_params(llm: LLM, sampling_params: SamplingParams | None,
                      sampling: dict[str, Any]) -> SamplingParams:
    """The SamplingParams of one call: ``sampling_params`` as given (it was checked when it was
    built, e.g. once by the CLI from its flags; its seed is used as is), or built once from the
    keyword arguments (field names or the aliases of :data:`pyllm.runtime.sampling.ALIASES`), where
    the LLM's seed is the default."""
    from pyllm.runtime.sampling import SamplingParams

    if sampling_params is not None:
        if not isinstance(sampling_params, SamplingParams):
            raise SamplingError(f"sampling_params must be a SamplingParams, got "
                                f"{type(sampling_params).__name__}")
        if any(v is not None for v in sampling.values()):
            raise SamplingError(f"give sampling_params or sampling keywords, not both (got "
                                f"{', '.join(sorted(sampling))})")
        return sampling_params
    if llm.seed >= 0 and sampling.get("seed") is None:
        # the LLM's seed is the default of every generation (no alias spells "seed")
        sampling = {**sampling, "seed": llm.seed}
    return SamplingParams.from_kwargs(**sampling)


def make_generation(llm: LLM, tokens: list[int], *, max_tokens: int | None,
                    stop: str | Sequence[str] | None, extra_stop: Sequence[str] = (),
                    logprobs: int | None = None, sampling_params: SamplingParams | None = None,
                    grammar: Grammar | str | None = None,
                    json_schema: dict[str, Any] | bool | str | None = None,
                    regex: str | None = None, keep_special: bool = False,
                    drafter: Drafter | None = None, context_shift: int | None = None,
                    **sampling: Any) -> Generation:
    """The generation of one call; sampling settings as :func:`generation_params` reads them
    (``LLM.generate`` / ``stream`` / ``chat`` / ``create_*`` pass ``sampling_params`` through).
    ``grammar`` (a :class:`~pyllm.runtime.grammar.Grammar` or GBNF text), ``json_schema`` or
    ``regex`` constrain the output (at most one of them). ``drafter`` (a
    :class:`~pyllm.runtime.speculative.NgramDrafter` or
    :class:`~pyllm.runtime.speculative.DraftModel`; default: ``llm.draft_model``) turns on
    speculative decoding; ``context_shift=N`` lets the generation go on past a full context,
    keeping the first N tokens and dropping half of the rest each time (None: it ends there)."""
    params = generation_params(llm, sampling_params, sampling)
    return Generation(llm, tokens, params, max_tokens, _stop_list(stop) + list(extra_stop),
                      stop_token_ids(llm), logprobs,
                      constraint_of(llm, from_options(grammar, json_schema, regex)),
                      keep_special, drafter if drafter is not None else llm.draft_model,
                      context_shift)


def constraint_of(llm: LLM, grammar: Grammar | None) -> Constraint | None:
    """The matcher of one generation under ``grammar`` (None: unconstrained)."""
    if grammar is None:
        return None
    from pyllm.runtime.grammar import Constraint

    return Constraint(grammar, llm.tokenizer, llm.n_vocab)


def _entries(pieces: Iterable[Piece]) -> list[shapes.TokenLogprobs]:
    """The logprobs of the pieces that have them (the text flushed at the end has none)."""
    return [shapes.TokenLogprobs(p.logprob.text, p.logprob.logprob,
                                 [(t, lp) for _, t, lp in p.logprob.top], p.text)
            for p in pieces if p.logprob is not None]


def _model_name(llm: LLM) -> str:
    return str(llm.model_path)


def create_completion(llm: LLM, prompt: str | Sequence[int], *, max_tokens: int | None = 16,
                      stop: str | Sequence[str] | None = None, stream: bool = False,
                      logprobs: int | None = None, echo: bool = False,
                      **sampling: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
    tokens = prompt_tokens(llm, prompt)
    gen = make_generation(llm, tokens, max_tokens=max_tokens, stop=stop, logprobs=logprobs,
                          **sampling)
    head = shapes.Head.completion(_model_name(llm))
    prefix = prompt if echo and isinstance(prompt, str) else (
        llm.detokenize(tokens) if echo else "")
    if stream:
        return _completion_chunks(gen, head, prefix, len(tokens), logprobs is not None)
    pieces = list(gen)
    lp = shapes.completion_logprobs(_entries(pieces), len(prefix)) if logprobs is not None \
        else None
    text = prefix + "".join(p.text for p in pieces)
    return shapes.completion(head, [shapes.completion_choice(0, text, lp, gen.finish_reason)],
                             shapes.usage(len(tokens), len(gen.tokens)))


def _completion_chunks(gen: Generation, head: shapes.Head, prefix: str, n_prompt: int,
                       logprobs: bool) -> Iterator[dict[str, Any]]:
    if prefix:
        yield shapes.completion_chunk(head, 0, prefix)
    for piece in gen:
        lp = shapes.completion_logprobs(_entries([piece]), 0) if logprobs else None
        if not piece.text and lp is None:
            continue
        yield shapes.completion_chunk(head, 0, piece.text, lp)
    # the API's last chunk carries the usage (the server sends it in a chunk of its own)
    yield shapes.completion_chunk(head, 0, "", None, gen.finish_reason,
                                  shapes.usage(n_prompt, len(gen.tokens)))


def create_chat_completion(llm: LLM, messages: Sequence[dict[str, Any]], *,
                           max_tokens: int | None = None,
                           stop: str | Sequence[str] | None = None, stream: bool = False,
                           chat_format: str | None = None, logprobs: bool = False,
                           top_logprobs: int | None = None,
                           response_format: dict[str, Any] | None = None,
                           tools: Sequence[dict[str, Any]] | None = None,
                           tool_choice: str | dict[str, Any] | None = None,
                           parallel_tool_calls: bool | None = None,
                           **sampling: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
    tokens, format_stops, plan = chat_with_tools(llm, messages, chat_format, tools, tool_choice,
                                                 parallel_tool_calls)
    n_lp = (top_logprobs or 0) if logprobs else None
    fmt = from_response_format(response_format)
    if fmt is not None:
        given = [k for k in ("grammar", "json_schema", "regex") if sampling.get(k) is not None]
        if given:
            raise GrammarError(f"give response_format or {given[0]}, not both")
        sampling["grammar"] = fmt
    if plan is not None and plan.grammar is not None:
        other = from_options(*(sampling.pop(k, None) for k in ("grammar", "json_schema",
                                                                "regex")))
        sampling["grammar"] = reply_grammar(plan, other)
    gen = make_generation(llm, tokens, max_tokens=max_tokens, stop=stop,
                          extra_stop=format_stops, logprobs=n_lp,
                          keep_special=plan is not None, **sampling)
    head = shapes.Head.chat(_model_name(llm))
    if stream:
        return _chat_chunks(gen, head, len(tokens), logprobs, plan)
    pieces = list(gen)
    lp = shapes.chat_logprobs(_entries(pieces)) if logprobs else None
    content, calls, finish = reply_fields(plan, "".join(p.text for p in pieces),
                                          gen.finish_reason)
    return shapes.chat_completion(head, [shapes.chat_choice(0, content, lp, finish, calls)],
                                  shapes.usage(len(tokens), len(gen.tokens)))


def _chat_chunks(gen: Generation, head: shapes.Head, n_prompt: int, logprobs: bool,
                 plan: ToolPlan | None) -> Iterator[dict[str, Any]]:
    yield shapes.chat_chunk(head, 0, shapes.role_delta())
    deltas = ToolDeltas(plan)
    for piece in gen:
        if not piece.text and piece.logprob is None:
            continue
        lp = shapes.chat_logprobs(_entries([piece])) if logprobs else None
        for i, delta in enumerate(deltas.feed(piece.text) or ([{}] if lp else [])):
            yield shapes.chat_chunk(head, 0, delta, lp if i == 0 else None)
    for delta in deltas.finish():
        yield shapes.chat_chunk(head, 0, delta)
    yield shapes.chat_chunk(head, 0, shapes.end_delta(), None,
                            deltas.finish_reason(gen.finish_reason),
                            shapes.usage(n_prompt, len(gen.tokens)))
