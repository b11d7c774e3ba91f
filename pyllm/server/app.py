"""The FastAPI application: OpenAI-compatible endpoints over the batching engine.

``create_app(config, engine=...)`` serves an engine that is already built (tests, embedding in
another program); ``create_app(config, loader=...)`` starts answering at once and builds the
engine on a thread (``/health`` says 503 "loading" meanwhile), which is what ``pyllm serve``
does.

Request bodies are read and parsed here rather than by FastAPI's automatic body handling so that
every failure has the OpenAI error shape and the right status: a body over the size limit is 413
(checked while reading, not only from Content-Length), bad JSON or fields 400, a prompt that does
not fit 400, a full queue 503. Compute never runs on the event loop: tokenization goes to the
thread pool, generation to the engine thread, whose events come back through
``loop.call_soon_threadsafe``. A text far longer than a slot's context could hold is refused
before it is tokenized (no token covers more bytes than the vocabulary's longest piece), and
after a request with a large body the allocator's free memory is handed back to the OS.

``create_app`` only wires things together: each route is a method of :class:`_Handlers`, which
parses and checks the request, hands the work to the engine through :mod:`pyllm.server.bridge`
and builds the response with :mod:`pyllm.runtime.openai_shapes` (the shapes the Python API returns
too).

Browsers must not be able to drive a local server from any web page, so the outermost layer
(:class:`pyllm.server.guard.Guard`, with the API key check and the HTTP counters) accepts only
Host headers naming this machine's loopback names or the configured
``allowed_hosts`` (a DNS-rebinding page sends its own host name), and POST bodies must be
``application/json`` (which a cross-site page cannot send without a CORS preflight, refused
unless ``cors_origins`` allows it).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import math
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from pyllm.errors import (
    ChatTemplateError,
    ContextError,
    GrammarError,
    ModelError,
    OutputError,
    PyllmError,
    SamplingError,
    StateFileError,
    TokenizerError,
    ToolCallError,
)
from pyllm.runtime import openai_shapes as shapes
from pyllm.runtime.tool_use import (
    ToolDeltas,
    ToolPlan,
    chat_with_tools,
    reply_fields,
    reply_grammar,
)
from pyllm.server.admin import check_slot_action, metrics_text, props, slot_target
from pyllm.server.bridge import (
    Choices,
    collect,
    logprob_entries,
    sse_events,
    sse_response,
    until_disconnect,
    usage,
)
from pyllm.server.engine import (
    DoneEvent,
    Engine,
    EngineStoppedError,
    Handle,
    QueueFullError,
    TokenEvent,
)
from pyllm.server.guard import Guard, json_error
from pyllm.server.schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    LoraList,
    TokenizeRequest,
    UnsupportedFieldError,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
M = TypeVar("M", bound=BaseModel)


@dataclass
class ServerConfig:
    """The settings of :func:`create_app` (``pyllm serve`` fills them from its flags).

    Attributes:
        model_id: The model name ``/v1/models`` lists and responses carry (``--alias``).
        api_key: The key every endpoint but ``/health`` requires as ``Authorization: Bearer``
            (``--api-key``); None: no key.
        cors_origins: Origins allowed to call the API from a browser (``--cors``).
        chat_format: A built-in chat format instead of the model's template
            (``--chat-format``).
        max_body_bytes: The largest request body accepted (larger: 413).
        allowed_hosts: Host header names accepted besides the loopback names
            (``--allowed-hosts``); ``"*"`` accepts any.
        slot_save_path: The folder of the ``POST /slots/{id}`` save / restore files
            (``--slot-save-path``); None turns those actions off.
    """

    model_id: str = "pyllm"
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    chat_format: str | None = None
    max_body_bytes: int = 1 << 20  # 1 MiB: far more than any prompt that fits a context
    # Host header names accepted besides guard.LOOPBACK_HOSTS (a port is ignored); "*" = any
    allowed_hosts: list[str] = field(default_factory=list)
    # --slot-save-path: the folder of POST /slots/{id}?action=save|restore files (None: off)
    slot_save_path: str | None = None


class _State:
    """What the handlers share: the engine once loaded, the load error, HTTP counters."""

    def __init__(self, config: ServerConfig, engine: Engine | None) -> None:
        self.config = config
        self.engine = engine
        self.load_error: str | None = None
        self.http = Counter[tuple[str, int]]()
        self.started = time.time()
        self._token_bytes: int | None = None
        self._token_bytes_lock = threading.Lock()

    @property
    def known_token_bytes(self) -> int | None:
        """:meth:`token_bytes` once it has been computed, else None."""
        return self._token_bytes

    def token_bytes(self, engine: Engine) -> int:
        """The most input bytes one token can cover: the longest vocabulary piece. Computed
        once (about a second for a 50k vocabulary: call it off the event loop)."""
        with self._token_bytes_lock:
            if self._token_bytes is None:
                self._token_bytes = engine.tokenizer.max_token_bytes
            return self._token_bytes

    def need_engine(self) -> Engine:
        if self.engine is not None:
            return self.engine
        if self.load_error is not None:
            raise ApiError(500, f"the model failed to load: {self.load_error}", "server_error")
        raise ApiError(503, "the model is still loading", "server_error", code="loading")


_ROUTES = ("/", "/health", "/metrics", "/props", "/v1/models", "/v1/completions",
           "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize",
           "/lora-adapters", "/slots")


# ---- body parsing -----------------------------------------------------------------------------


def _check_json_type(request: Request) -> None:
    """POST bodies must say they are JSON: text/plain, forms and untyped bodies are what a page
    on another site may send without asking (no CORS preflight), so they are refused."""
    ctype = request.headers.get("content-type")
    media = (ctype or "").partition(";")[0].strip().lower()
    if media == "application/json" or (media.startswith("application/")
                                       and media.endswith("+json")):
        return
    got = f"got {ctype!r}" if ctype else "no Content-Type was sent"
    raise ApiError(415, f"the request body must be JSON sent with 'Content-Type: "
                        f"application/json' ({got})", code="unsupported_media_type")


async def _read_json(request: Request, limit: int, list_ok: bool = False) -> Any:
    _check_json_type(request)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body is {length} bytes; the limit is {limit}",
                       code="body_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes",
                           code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"invalid JSON body: {e}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "invalid JSON body: nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict) and not (list_ok and isinstance(body, list)):
        what = "a JSON object or array" if list_ok else "a JSON object"
        raise ApiError(400, f"the request body must be {what}", code="invalid_json")
    return body


def _parse(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = [str(p) for p in err.get("loc", ())]
        param = ".".join(loc) or None
        if err.get("type") == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {param}"
        else:
            msg = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
        raise ApiError(400, msg, param=param) from None


def _sampling(req: CompletionRequest | ChatCompletionRequest) -> Any:
    try:
        req.check_supported()
        return req.sampling_params()
    except UnsupportedFieldError as e:
        raise ApiError(400, str(e), param=e.param, code="unsupported") from None
    except SamplingError as e:
        raise ApiError(400, str(e)) from None


async def _check_text_fits(state: _State, eng: Engine, text_bytes: int, limit: int,
                           what: str, param: str) -> None:
    """Refuse, without tokenizing, a text that cannot fit: B bytes are at least
    ceil(B / longest piece) tokens. ``limit`` is the most tokens the text may have."""
    per_token = state.known_token_bytes or await run_in_threadpool(state.token_bytes, eng)
    at_least = math.ceil(text_bytes / per_token)
    if at_least > limit:
        raise ApiError(400, f"{what} is {text_bytes} bytes, so at least {at_least} tokens (no "
                            f"token is longer than {per_token} bytes); a slot's context holds "
                            f"{eng.n_ctx} tokens (n_ctx)", param=param,
                       code="context_length_exceeded")


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


# ---- the application --------------------------------------------------------------------------


def create_app(config: ServerConfig | None = None, *, engine: Engine | None = None,
               loader: Callable[[], Engine] | None = None,
               on_ready: Callable[[Engine], None] | None = None) -> ASGIApp:
    """The ASGI application. Give either a ready ``engine`` (the caller stops it) or a
    ``loader`` run on a thread at startup (its engine is stopped, in-flight work cancelled, at
    shutdown); ``on_ready`` is called on that thread once the loaded engine serves requests.

    Args:
        config: The server settings (default: ``ServerConfig()``).
        engine: A running engine to serve.
        loader: Builds the engine; run on a thread when the app starts.
        on_ready: Called with the engine once it is loaded.

    Returns:
        The ASGI app (serve it with uvicorn).

    Raises:
        ValueError: Both or neither of ``engine`` and ``loader`` given.
    """
    config = config or ServerConfig()
    if (engine is None) == (loader is None):
        raise ValueError("give exactly one of engine= or loader=")
    state = _State(config, engine)
    app = FastAPI(title="pyllm", lifespan=_lifespan(state, loader, on_ready), docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.pyllm = state
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    handlers = _Handlers(state)
    for method, path, endpoint in (
            ("GET", "/health", handlers.health),
            ("GET", "/v1/models", handlers.models),
            ("GET", "/props", handlers.props),
            ("GET", "/lora-adapters", handlers.lora_adapters),
            ("POST", "/lora-adapters", handlers.set_lora_adapters),
            ("GET", "/slots", handlers.slots),
            ("POST", "/slots/{id_slot}", handlers.slot_action),
            ("GET", "/metrics", handlers.metrics),
            ("GET", "/", handlers.index),
            ("POST", "/tokenize", handlers.tokenize),
            ("POST", "/detokenize", handlers.detokenize),
            ("POST", "/v1/embeddings", handlers.embeddings),
            ("POST", "/v1/completions", handlers.completions),
            ("POST", "/v1/chat/completions", handlers.chat_completions)):
        app.add_api_route(path, endpoint, methods=[method])
    asgi: ASGIApp = app
    if config.cors_origins:
        asgi = CORSMiddleware(asgi, allow_origins=config.cors_origins, allow_methods=["*"],
                              allow_headers=["*"])
    return Guard(asgi, state, _ROUTES)


def _lifespan(state: _State, loader: Callable[[], Engine] | None,
              on_ready: Callable[[Engine], None] | None
              ) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """With a ``loader``: load the engine on a thread at startup, stop it at shutdown."""

    def load() -> None:
        assert loader is not None
        try:
            engine = loader()
            state.token_bytes(engine)  # here rather than on the first request
            state.engine = engine
            if on_ready is not None:
                on_ready(engine)
        except PyllmError as e:
            state.load_error = str(e)
        except Exception as e:  # report, never take the process down
            state.load_error = f"{type(e).__name__}: {e}"

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if loader is not None:
            threading.Thread(target=load, name="pyllm-load", daemon=True).start()
        yield
        if loader is not None and state.engine is not None:  # a given engine is the caller's
            await run_in_threadpool(state.engine.stop)

    return lifespan


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body, status_code=exc.status)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return json_error(exc.status_code, str(exc.detail), type_)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    return json_error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


async def _guarded(fn: Callable[[], Awaitable[Response]]) -> Response:
    # PyllmError from tokenizer/chat templates = bad input, not a server fault
    try:
        return await fn()
    except (ChatTemplateError, TokenizerError) as e:
        raise ApiError(400, str(e)) from None
    except ToolCallError as e:  # the tools or tool_choice of the request
        raise ApiError(400, str(e), param="tool_choice" if "tool_choice" in str(e)
                       else "tools") from None
    except GrammarError as e:  # a function's parameter schema the grammar engine cannot use
        raise ApiError(400, str(e), param="tools") from None


def _embedding_submit_error(e: PyllmError) -> ApiError:
    code = "queue_full" if isinstance(e, QueueFullError) else None
    status = 503 if isinstance(e, QueueFullError | EngineStoppedError) else 400
    return ApiError(status, str(e), param="input", code=code)


class _Handlers:
    """The route bodies. Each parses its request, checks what it can before any work, and
    leaves the work to the engine (through :mod:`pyllm.server.bridge`) and the response shapes
    to :mod:`pyllm.runtime.openai_shapes`."""

    def __init__(self, state: _State) -> None:
        self.state = state
        self.config = state.config

    async def _body(self, request: Request, model: type[M]) -> M:
        return _parse(model, await _read_json(request, self.config.max_body_bytes))

    # ---- simple endpoints -----------------------------------------------------------------

    async def health(self) -> Response:
        """Whether the server can take requests: 200 ``{"status": "ok", "slots_idle",
        "slots_processing", "queue"}``; 503 ``"loading"`` while the model loads or
        ``"stopped"``; 500 ``"error"`` with the message when loading failed. Needs no API key."""
        state = self.state
        if state.engine is None:
            if state.load_error is not None:
                return JSONResponse({"status": "error", "message": state.load_error}, 500)
            return JSONResponse({"status": "loading"}, 503)
        eng = state.engine
        if not eng.running:
            return JSONResponse({"status": "stopped"}, 503)
        return JSONResponse({"status": "ok", "slots_idle": eng.n_parallel - eng.active,
                             "slots_processing": eng.active, "queue": eng.queue_depth})

    async def models(self) -> Response:
        """OpenAI's model list: the one model served (its id is ``--alias``, else the model
        file's name), with the slot context size, slot count and vocabulary size under
        ``meta``."""
        eng = self.state.need_engine()
        return JSONResponse({"object": "list", "data": [{
            "id": self.config.model_id, "object": "model", "created": int(self.state.started),
            "owned_by": "pyllm",
            "meta": {"n_ctx_slot": eng.n_ctx, "n_parallel": eng.n_parallel,
                     "n_vocab": eng.n_vocab}}]})

    async def props(self) -> Response:
        """llama.cpp's GET /props: the default generation settings (sampling parameters, the
        context size per slot, the default ``max_tokens`` of each route), the slot count, the
        model's alias and path, and its chat template."""
        return JSONResponse(props(self.config, self.state.need_engine()))

    async def lora_adapters(self) -> Response:
        """llama.cpp's GET /lora-adapters: the adapters loaded at start with their global
        scales."""
        return JSONResponse(self.state.need_engine().lora_adapters())

    async def set_lora_adapters(self, request: Request) -> Response:
        """llama.cpp's POST /lora-adapters: ``[{"id": 0, "scale": 0.5}, ...]`` sets the global
        scales (unlisted adapters: 0) for requests without a ``lora`` field."""
        eng = self.state.need_engine()
        body = await _read_json(request, self.config.max_body_bytes, list_ok=True)
        entries = _parse(LoraList, {"adapters": body}).adapters
        try:
            eng.set_lora_scales([(e.id, e.scale) for e in entries])
        except ModelError as e:
            raise ApiError(400, str(e), param="lora") from None
        return JSONResponse(eng.lora_adapters())

    async def slots(self) -> Response:
        """llama.cpp's GET /slots: each slot's id, context size, whether it is busy and the
        tokens its cache holds."""
        return JSONResponse(self.state.need_engine().slots_info())

    async def slot_action(self, id_slot: str, request: Request) -> Response:
        """llama.cpp's POST /slots/{id}?action=save|restore (body ``{"filename": NAME}``, a
        file in --slot-save-path) or ?action=erase: an idle slot's cache to or from a state
        file, or emptied."""
        eng = self.state.need_engine()
        action = request.query_params.get("action", "")
        check_slot_action(id_slot, action, self.config.slot_save_path)
        body = (await _read_json(request, self.config.max_body_bytes)
                if action != "erase" else {})
        slot, path = slot_target(id_slot, action, self.config.slot_save_path, body)
        try:
            result = await run_in_threadpool(eng.slot_action, slot, action, path)
        except StateFileError as e:
            raise ApiError(400, str(e), param="filename") from None
        except (ContextError, OutputError) as e:
            raise ApiError(400, str(e)) from None
        return JSONResponse(result)

    async def metrics(self) -> Response:
        """Prometheus text format: requests and tokens served, tokens per second, slots busy,
        queue depth, HTTP responses by route and status."""
        return PlainTextResponse(metrics_text(self.state),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def index(self) -> Response:
        """The chat page (one self-contained HTML file). With an API key set, open it as
        ``/?api_key=KEY``."""
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    async def tokenize(self, request: Request) -> Response:
        """llama.cpp's POST /tokenize: ``{"tokens": [ids]}``, or with ``with_pieces``
        ``{"tokens": [{"id", "piece"}]}``."""
        req = await self._body(request, TokenizeRequest)
        eng = self.state.need_engine()

        async def run() -> Response:
            tok = eng.tokenizer
            ids = await run_in_threadpool(functools.partial(
                tok.encode, req.content, add_special=req.add_special,
                parse_special=req.parse_special))
            if req.with_pieces:
                return JSONResponse({"tokens": [{"id": int(t), "piece": tok.token_to_piece(t)}
                                                for t in ids]})
            return JSONResponse({"tokens": [int(t) for t in ids]})
        return await _guarded(run)

    async def detokenize(self, request: Request) -> Response:
        """llama.cpp's POST /detokenize: ``{"content": text}`` of token ids (400 for an id
        outside the vocabulary)."""
        req = await self._body(request, DetokenizeRequest)
        eng = self.state.need_engine()
        bad = [t for t in req.tokens if not 0 <= t < eng.n_vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary "
                                f"(n_vocab {eng.n_vocab})", param="tokens")

        async def run() -> Response:
            text = await run_in_threadpool(eng.tokenizer.decode, req.tokens)
            return JSONResponse({"content": text})
        return await _guarded(run)

    # ---- embeddings -----------------------------------------------------------------------

    async def embeddings(self, request: Request) -> Response:
        """OpenAI's embeddings: one vector per input (the mean of the final-normed hidden
        states over its tokens, L2-normalized), as floats or base64 float32."""
        req = await self._body(request, EmbeddingRequest)
        eng = self.state.need_engine()
        if not eng.supports_embeddings:
            raise ApiError(501, "embeddings need a newer build of the pyllm extension "
                                "(Context.embed)", "server_error", code="not_supported")
        if req.dimensions is not None and req.dimensions != eng.n_embd:
            raise ApiError(400, f"this model's embeddings have {eng.n_embd} dimensions",
                           param="dimensions")

        async def run() -> Response:
            token_lists = await self._embedding_inputs(eng, req)
            results = await self._embed(request, eng, token_lists)
            if results is None:
                return Response(status_code=499)
            data = []
            for i, (vec, err) in enumerate(results):
                if vec is None:
                    raise ApiError(500, err or "embedding failed", "server_error")
                emb: Any = (base64.b64encode(vec.astype("<f4").tobytes()).decode()
                            if req.encoding_format == "base64" else vec.tolist())
                data.append({"object": "embedding", "index": i, "embedding": emb})
            n = sum(len(t) for t in token_lists)
            return JSONResponse({"object": "list", "data": data, "model": self.config.model_id,
                                 "usage": {"prompt_tokens": n, "total_tokens": n}})
        return await _guarded(run)

    async def _embedding_inputs(self, eng: Engine, req: EmbeddingRequest) -> list[list[int]]:
        """Each input's tokens: texts are checked to fit, then tokenized off the event loop."""
        from pyllm.runtime.generation import prompt_tokens

        for x in req.inputs():
            if isinstance(x, str):
                await _check_text_fits(self.state, eng, _utf8_len(x), eng.n_ctx, "an input",
                                       "input")
        return [await run_in_threadpool(prompt_tokens, eng, x)
                if isinstance(x, str) else x for x in req.inputs()]

    async def _embed(self, request: Request, eng: Engine, token_lists: list[list[int]]
                     ) -> list[tuple[Any, str | None]] | None:
        """(vector or None, error) per input; None if the client went away first. Every
        submitted job is cancelled on the way out (a no-op for a finished one)."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        handles: list[Handle] = []
        try:
            for toks in token_lists:
                fut: asyncio.Future[Any] = loop.create_future()

                def done(vec: Any, err: str | None, fut: asyncio.Future[Any] = fut) -> None:
                    loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result((vec, err)))
                try:
                    handles.append(eng.submit_embedding(toks, done))
                except PyllmError as e:
                    raise _embedding_submit_error(e) from None
                futures.append(fut)
            results: list[tuple[Any, str | None]] | None = await until_disconnect(
                request, asyncio.gather(*futures))
            return results
        finally:
            for h in handles:
                h.cancel()

    # ---- completions ----------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        """OpenAI's text completion of one prompt (text or token ids): ``n`` choices decoded
        together, ``logprobs``, ``echo``, stop strings, a grammar or JSON schema; with
        ``"stream": true`` server-sent events ending in ``data: [DONE]``."""
        req = await self._body(request, CompletionRequest)
        params = _sampling(req)
        eng = self.state.need_engine()

        async def run() -> Response:
            grammar = await run_in_threadpool(req.grammar_spec)
            tokens, echo = await self._completion_prompt(eng, req)
            choices = Choices(eng, tokens, params, req.n, req.token_limit(), req.stop_list(),
                              req.logprobs, grammar, lora=req.lora_mix())
            head = shapes.Head.completion(self.config.model_id)
            if req.stream:
                return _stream_completion(eng, req, choices, head, echo)
            got = await collect(request, choices)
            if got is None:
                return Response(status_code=499)  # nobody is listening any more
            return JSONResponse(shapes.completion(head, [
                shapes.completion_choice(
                    i, echo + "".join(p.text for p in pieces),
                    shapes.completion_logprobs(logprob_entries(eng, pieces), len(echo))
                    if req.logprobs is not None else None, done.finish_reason)
                for i, (pieces, done) in enumerate(got)], usage([done for _, done in got])))
        return await _guarded(run)

    async def _completion_prompt(self, eng: Engine, req: CompletionRequest
                                 ) -> tuple[list[int], str]:
        """The prompt's tokens, and the text to echo before the completion ('' without
        ``echo``)."""
        from pyllm.runtime.generation import prompt_tokens

        prompt = req.prompt
        if isinstance(prompt, list):
            tokens = [int(t) for t in prompt]
        else:
            # a slot must keep a position to generate into: n_ctx - 1 prompt tokens at most
            await _check_text_fits(self.state, eng, _utf8_len(prompt), eng.n_ctx - 1,
                                   "the prompt", "prompt")
            tokens = await run_in_threadpool(prompt_tokens, eng, prompt)
        echo = ""
        if req.echo:
            echo = prompt if isinstance(prompt, str) else await run_in_threadpool(
                eng.tokenizer.decode, tokens)
        return tokens, echo

    async def chat_completions(self, request: Request) -> Response:
        """OpenAI's chat completion: the messages rendered with the model's chat template (or
        ``--chat-format``), tools and ``tool_choice``, ``response_format``, ``logprobs``; with
        ``"stream": true`` server-sent events ending in ``data: [DONE]``."""
        req = await self._body(request, ChatCompletionRequest)
        params = _sampling(req)
        eng = self.state.need_engine()

        async def run() -> Response:
            messages = [m.as_dict() for m in req.messages]
            # the template only adds to the messages' text
            await _check_text_fits(self.state, eng,
                                   sum(_utf8_len(m["content"]) for m in messages),
                                   eng.n_ctx - 1, "the conversation", "messages")
            grammar = await run_in_threadpool(req.grammar_spec)
            tokens, format_stops, plan = await run_in_threadpool(
                chat_with_tools, eng, messages, self.config.chat_format, req.tools,
                req.tool_choice, req.parallel_tool_calls)
            grammar = reply_grammar(plan, grammar)
            n_lp = (req.top_logprobs or 0) if req.logprobs else None
            choices = Choices(eng, tokens, params, req.n, req.token_limit(),
                              req.stop_list() + format_stops, n_lp, grammar,
                              keep_special=plan is not None, lora=req.lora_mix())
            head = shapes.Head.chat(self.config.model_id)
            if req.stream:
                return _stream_chat(eng, req, choices, head, plan)
            got = await collect(request, choices)
            if got is None:
                return Response(status_code=499)
            out = []
            for i, (pieces, done) in enumerate(got):
                content, calls, finish = reply_fields(plan, "".join(p.text for p in pieces),
                                                      done.finish_reason)
                lp = shapes.chat_logprobs(logprob_entries(eng, pieces)) if req.logprobs \
                    else None
                out.append(shapes.chat_choice(i, content, lp, finish, calls))
            return JSONResponse(shapes.chat_completion(head, out,
                                                       usage([done for _, done in got])))
        return await _guarded(run)


def _stream_completion(eng: Engine, req: CompletionRequest, choices: Choices,
                       head: shapes.Head, echo: str) -> Response:
    """Server-sent ``text_completion`` chunks: the echoed prompt per choice, a chunk per token
    that shows text or logprobs, a final chunk per choice, then the usage if asked for."""

    def chunk(index: int, ev: TokenEvent) -> list[dict[str, Any]]:
        lp = (shapes.completion_logprobs(logprob_entries(eng, [ev]), 0)
              if req.logprobs is not None else None)
        if not ev.text and lp is None:
            return []
        return [shapes.completion_chunk(head, index, ev.text, lp)]

    def final(index: int, done: DoneEvent) -> list[dict[str, Any]]:
        return [shapes.completion_chunk(head, index, "", None, done.finish_reason)]

    def tail(ends: list[DoneEvent]) -> list[dict[str, Any]]:
        return ([shapes.usage_chunk(head, shapes.TEXT_COMPLETION, usage(ends))]
                if req.include_usage else [])

    first = [shapes.completion_chunk(head, i, echo) for i in range(req.n)] if echo else []
    return sse_response(sse_events(choices, first, chunk, final, tail))


def _stream_chat(eng: Engine, req: ChatCompletionRequest, choices: Choices,
                 head: shapes.Head, plan: ToolPlan | None) -> Response:
    """Server-sent ``chat.completion.chunk`` s: the role per choice, a chunk per token that
    shows text or logprobs (with tools: content as it comes, text that may be a call held back
    until it is one, then a ``tool_calls`` delta per call), a final chunk per choice, then the
    usage if asked for."""
    deltas = [ToolDeltas(plan) for _ in range(req.n)]

    def chunk(index: int, ev: TokenEvent) -> list[dict[str, Any]]:
        lp = shapes.chat_logprobs(logprob_entries(eng, [ev])) if req.logprobs else None
        if not ev.text and lp is None:
            return []
        shown = deltas[index].feed(ev.text) or ([{}] if lp is not None else [])
        return [shapes.chat_chunk(head, index, d, lp if i == 0 else None)
                for i, d in enumerate(shown)]

    def final(index: int, done: DoneEvent) -> list[dict[str, Any]]:
        d = deltas[index]
        return [*(shapes.chat_chunk(head, index, delta) for delta in d.finish()),
                shapes.chat_chunk(head, index, shapes.end_delta(), None,
                                  d.finish_reason(done.finish_reason))]

    def tail(ends: list[DoneEvent]) -> list[dict[str, Any]]:
        return ([shapes.usage_chunk(head, shapes.CHAT_COMPLETION_CHUNK, usage(ends))]
                if req.include_usage else [])

    # the server's first delta also carries an empty content (as it always has)
    first = [shapes.chat_chunk(head, i, shapes.role_delta(""), None)
             for i in range(req.n)]
    return sse_response(sse_events(choices, first, chunk, final, tail))


def cancel_all(app: ASGIApp) -> None:
    """Cancel every queued and running request of an app made by :func:`create_app` and stop
    its engine: clients still connected get a 'shutting down' error instead of a cut
    connection. For the end of a graceful shutdown."""
    state = getattr(app, "state", None)
    if isinstance(state, _State) and state.engine is not None:
        state.engine.stop()
