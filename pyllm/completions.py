"""OpenAI-shaped completion results (llama-cpp-python compatible) built on :mod:`pyllm.generate`.

``create_completion`` / ``create_chat_completion`` return the dicts the OpenAI API returns
(``id``, ``object``, ``created``, ``model``, ``choices`` with ``finish_reason``, ``usage``), or with
``stream=True`` an iterator of chunk dicts, so code written for llama-cpp-python or the OpenAI
client works unchanged.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from pyllm.errors import SamplingError
from pyllm.generate import Generation, Piece, chat_prompt, prompt_tokens, stop_token_ids

if TYPE_CHECKING:
    from pyllm.model import LLM
    from pyllm.sampling import SamplingParams


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
    keyword arguments (field names or the aliases of :data:`pyllm.sampling.ALIASES`), where the
    LLM's seed is the default."""
    from pyllm.sampling import SamplingParams

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
                    **sampling: Any) -> Generation:
    """The generation of one call; sampling settings as :func:`generation_params` reads them
    (``LLM.generate`` / ``stream`` / ``chat`` / ``create_*`` pass ``sampling_params`` through)."""
    params = generation_params(llm, sampling_params, sampling)
    return Generation(llm, tokens, params, max_tokens, _stop_list(stop) + list(extra_stop),
                      stop_token_ids(llm), logprobs)


def _logprobs_block(pieces: list[Piece], offset0: int) -> dict[str, Any]:
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset0
    for p in pieces:
        if p.logprob is None:
            continue
        tokens.append(p.logprob.text)
        lps.append(p.logprob.logprob)
        tops.append({t: lp for _, t, lp in p.logprob.top})
        offsets.append(pos)
        pos += len(p.text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": offsets}


def _model_name(llm: LLM) -> str:
    return str(llm.model_path)


def create_completion(llm: LLM, prompt: str | Sequence[int], *, max_tokens: int | None = 16,
                      stop: str | Sequence[str] | None = None, stream: bool = False,
                      logprobs: int | None = None, echo: bool = False,
                      **sampling: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
    tokens = prompt_tokens(llm, prompt)
    gen = make_generation(llm, tokens, max_tokens=max_tokens, stop=stop, logprobs=logprobs,
                          **sampling)
    cid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model = _model_name(llm)
    prefix = prompt if echo and isinstance(prompt, str) else (
        llm.detokenize(tokens) if echo else "")

    def usage() -> dict[str, int]:
        return {"prompt_tokens": len(tokens), "completion_tokens": len(gen.tokens),
                "total_tokens": len(tokens) + len(gen.tokens)}

    if stream:
        def chunks() -> Iterator[dict[str, Any]]:
            if prefix:
                yield {"id": cid, "object": "text_completion", "created": created,
                       "model": model, "choices": [{"text": prefix, "index": 0,
                                                    "logprobs": None, "finish_reason": None}]}
            for piece in gen:
                lp = _logprobs_block([piece], 0) if logprobs is not None else None
                if not piece.text and lp is None:
                    continue
                yield {"id": cid, "object": "text_completion", "created": created,
                       "model": model, "choices": [{"text": piece.text, "index": 0,
                                                    "logprobs": lp, "finish_reason": None}]}
            yield {"id": cid, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"text": "", "index": 0, "logprobs": None,
                                "finish_reason": gen.finish_reason}],
                   "usage": usage()}
        return chunks()

    pieces = list(gen)
    text = "".join(p.text for p in pieces)
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": prefix + text, "index": 0,
                         "logprobs": _logprobs_block(pieces, len(prefix))
                         if logprobs is not None else None,
                         "finish_reason": gen.finish_reason}],
            "usage": usage()}


def create_chat_completion(llm: LLM, messages: Sequence[dict[str, Any]], *,
                           max_tokens: int | None = None,
                           stop: str | Sequence[str] | None = None, stream: bool = False,
                           chat_format: str | None = None, logprobs: bool = False,
                           top_logprobs: int | None = None,
                           **sampling: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
    tokens, format_stops = chat_prompt(llm, messages, chat_format)
    n_lp = (top_logprobs or 0) if logprobs else None
    gen = make_generation(llm, tokens, max_tokens=max_tokens, stop=stop,
                          extra_stop=format_stops, logprobs=n_lp, **sampling)
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model = _model_name(llm)

    def lp_content(pieces: list[Piece]) -> list[dict[str, Any]]:
        out = []
        for p in pieces:
            if p.logprob is None:
                continue
            out.append({"token": p.logprob.text, "logprob": p.logprob.logprob,
                        "bytes": list(p.logprob.text.encode()),
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                         for _, t, lp in p.logprob.top]})
        return out

    def usage() -> dict[str, int]:
        return {"prompt_tokens": len(tokens), "completion_tokens": len(gen.tokens),
                "total_tokens": len(tokens) + len(gen.tokens)}

    if stream:
        def chunks() -> Iterator[dict[str, Any]]:
            head = {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": model}
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                        "logprobs": None, "finish_reason": None}]}
            for piece in gen:
                if not piece.text and piece.logprob is None:
                    continue
                lp = {"content": lp_content([piece])} if logprobs else None
                yield {**head, "choices": [{"index": 0, "delta": {"content": piece.text},
                                            "logprobs": lp, "finish_reason": None}]}
            yield {**head, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": gen.finish_reason}],
                   "usage": usage()}
        return chunks()

    pieces = list(gen)
    text = "".join(p.text for p in pieces)
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": {"content": lp_content(pieces)} if logprobs else None,
                         "finish_reason": gen.finish_reason}],
            "usage": usage()}
