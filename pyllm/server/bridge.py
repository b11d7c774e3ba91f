"""Between the engine and HTTP: the choices of one request, server-sent events, collected
results, and engine events turned into the inputs of :mod:`pyllm.runtime.openai_shapes` (usage,
logprobs).

Engine events arrive on the engine thread; :class:`Choices` moves them onto the event loop
(``loop.call_soon_threadsafe``) tagged with the choice index. Closing a stream or losing the
client cancels the engine requests, which frees their slots at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from pyllm.errors import ContextError, GrammarError, ModelError, SamplingError
from pyllm.runtime import openai_shapes as shapes
from pyllm.runtime.grammar import Grammar
from pyllm.runtime.sampling import InvalidSamplingParam, SamplingParams
from pyllm.server.engine import (
    DoneEvent,
    Engine,
    EngineStoppedError,
    ErrorEvent,
    Event,
    Handle,
    QueueFullError,
    TokenEvent,
)
from pyllm.server.engine import Request as EngineRequest
from pyllm.server.schemas import ApiError


class Choices:
    """The ``n`` engine requests (choices) of one HTTP request. Their events are moved from the
    engine thread onto the event loop, tagged with the choice index."""

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams, n: int,
                 max_tokens: int | None, stop: list[str], logprobs: int | None,
                 grammar: Grammar | None = None, keep_special: bool = False,
                 lora: list[tuple[int, float]] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.n = n
        self.handles: list[Handle] = []
        try:
            for i in range(n):
                # with a fixed seed the choices still differ, and the request stays repeatable
                p = params if i == 0 or params.seed < 0 else dataclasses.replace(
                    params, seed=(params.seed + i) % 2**32)
                req = EngineRequest(prompt, p, self._push(i), max_tokens, stop, logprobs,
                                    grammar, keep_special, lora)
                self.handles.append(submit(engine, req))
        except BaseException:
            self.cancel()
            raise

    def _push(self, index: int) -> Callable[[Event], None]:
        def push(event: Event) -> None:  # engine thread
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        return push

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()  # no-op for a finished one

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent | DoneEvent]]:
        """(choice index, event) until every choice is done. An engine error or a cancellation
        by the server (the client is still here, so it is shutting down) raises ApiError."""
        left = self.n
        while left:
            index, ev = await self.queue.get()
            if isinstance(ev, ErrorEvent):
                raise ApiError(500, ev.message, "server_error")
            if isinstance(ev, DoneEvent):
                if ev.finish_reason == "cancelled":
                    raise ApiError(503, _CANCELLED, "server_error", code="shutting_down")
                left -= 1
            yield index, ev


# A request cancelled while its client is still connected was cancelled by the server.
_CANCELLED = "the request was cancelled: the server is shutting down"


def submit(engine: Engine, req: EngineRequest) -> Handle:
    try:
        return engine.submit(req)
    except QueueFullError as e:
        raise ApiError(503, str(e), "server_error", code="queue_full") from None
    except EngineStoppedError as e:
        raise ApiError(503, str(e), "server_error", code="shutting_down") from None
    except ContextError as e:
        msg = str(e)
        code = "context_length_exceeded" if "exceed" in msg or "holds" in msg else None
        raise ApiError(400, msg, param="max_tokens" if "max_tokens" in msg else "prompt",
                       code=code) from None
    except ModelError as e:  # a `lora` entry naming no adapter loaded at start
        raise ApiError(400, str(e), param="lora") from None
    except GrammarError as e:  # checked before; a matcher that cannot start is still a 400
        raise ApiError(400, str(e)) from None
    except SamplingError as e:  # e.g. a logit_bias token outside this model's vocabulary
        param = e.param if isinstance(e, InvalidSamplingParam) else None
        raise ApiError(400, str(e), param=param) from None


async def wait_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (or nothing).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, awaitable: Awaitable[Any]) -> Any:
    """The result of ``awaitable``, or None when the client disconnects first (then the
    awaitable is cancelled)."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        return work.result() if work.done() else None
    finally:
        for task in (work, watch):
            task.cancel()


Result = list[tuple[list[TokenEvent], DoneEvent]]


async def collect(request: Request, choices: Choices) -> Result | None:
    """Every choice's tokens and end; None if the client went away first (the requests are
    then cancelled, freeing their slots)."""

    async def gather() -> Result:
        pieces: list[list[TokenEvent]] = [[] for _ in range(choices.n)]
        ends: dict[int, DoneEvent] = {}
        async for index, ev in choices.events():
            if isinstance(ev, TokenEvent):
                pieces[index].append(ev)
            else:
                ends[index] = ev
        return [(pieces[i], ends[i]) for i in range(choices.n)]

    try:
        result: Result | None = await until_disconnect(request, gather())
        return result
    finally:
        choices.cancel()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def sse_events(choices: Choices, first: list[dict[str, Any]],
                  chunk: Callable[[int, TokenEvent], list[dict[str, Any]]],
                  final: Callable[[int, DoneEvent], list[dict[str, Any]]],
                  tail: Callable[[list[DoneEvent]], list[dict[str, Any]]]) -> AsyncIterator[str]:
    """Server-sent events ending in ``data: [DONE]``: ``first``, the chunks of each token (often
    one, none while text is held back), the final chunks of each choice, then ``tail`` (the
    usage chunk). Closing this generator (the client disconnected) cancels the requests."""
    try:
        for obj in first:
            yield _sse(obj)
        ends: list[DoneEvent] = []
        try:
            async for index, ev in choices.events():
                if isinstance(ev, TokenEvent):
                    for out in chunk(index, ev):
                        yield _sse(out)
                else:
                    ends.append(ev)
                    for out in final(index, ev):
                        yield _sse(out)
        except ApiError as e:
            yield _sse(e.body)
        else:
            for obj in tail(ends):
                yield _sse(obj)
        yield "data: [DONE]\n\n"
    finally:
        choices.cancel()


def sse_response(gen: AsyncIterator[str]) -> Response:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def usage(ends: list[DoneEvent]) -> dict[str, int]:
    """The prompt counts once however many choices were generated from it."""
    return shapes.usage(ends[0].prompt_tokens if ends else 0,
                        sum(e.completion_tokens for e in ends))


def logprob_entries(engine: Engine, events: list[TokenEvent]) -> list[shapes.TokenLogprobs]:
    """The logprobs of the events that have them, as text (token ids become their pieces)."""
    piece = engine.tokenizer.token_to_piece
    return [shapes.TokenLogprobs(piece(ev.logprob.token), ev.logprob.logprob,
                                 [(piece(t), lp) for t, lp in ev.logprob.top_logprobs], ev.text)
            for ev in events if ev.logprob is not None]
