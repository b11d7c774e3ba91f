"""The server's outermost ASGI layer (:func:`pyllm.server.app.create_app` wraps every app in
:class:`Guard`): which Host names and API keys are served, the HTTP counters by route and
status, and memory given back to the OS after large request bodies; and the one shape of an
error response.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pyllm.runtime.sysinfo import release_free_memory
from pyllm.server.schemas import error_body

if TYPE_CHECKING:
    from pyllm.server.app import _State

# Host names always accepted: this machine's loopback (with any port)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# after a request body larger than this, free memory goes back to the OS (its text, tokens and
# the tokenizer's scratch were large enough to leave the allocator holding pages)
LARGE_BODY_BYTES = 64 * 1024


def json_error(status: int, message: str, type_: str, param: str | None = None,
               code: str | None = None) -> JSONResponse:
    """An OpenAI-shaped error response."""
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def host_name(value: str) -> str:
    """The name in a Host header value: no port, no IPv6 brackets, lower case, no final dot."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        name = v[1:end] if end > 0 else v[1:]
    elif v.count(":") == 1:
        name = v.partition(":")[0]
    else:  # a plain name, or an IPv6 address without brackets
        name = v
    return name.rstrip(".")


def _bearer_token(value: bytes) -> bytes | None:
    """The credentials of an ``Authorization: Bearer TOKEN`` header; the scheme name is
    case-insensitive (RFC 9110), so ``bearer`` and ``BEARER`` count too."""
    scheme, _, token = value.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


class Guard:
    """Outermost ASGI layer: Host check, API key check, HTTP counters, memory given back.

    Only Host names of this machine's loopback and ``allowed_hosts`` are served: a web page that
    rebinds its own domain to 127.0.0.1 reaches the port, but its requests carry its domain.

    With an API key set, everything but ``/health`` needs it. A browser cannot attach a header to
    a plain navigation, so the chat page ``GET /`` also takes the key as ``?api_key=KEY`` (the
    page then sends it as a header on its own API calls).

    Written as plain ASGI rather than an ``@app.middleware`` so that streaming responses and
    disconnect detection pass through untouched.
    """

    PUBLIC = frozenset({"/health"})

    def __init__(self, app: ASGIApp, state: _State, routes: Iterable[str]) -> None:
        self.app = app
        self.state = state
        self.routes = frozenset(routes)  # counted by name; any other path as "other"
        key = state.config.api_key
        self.expected = key.encode() if key else None
        hosts = state.config.allowed_hosts
        self.any_host = "*" in hosts
        self.hosts = frozenset(LOOPBACK_HOSTS) | {host_name(h) for h in hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        status = 500
        received = 0

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        try:
            refusal = self._host_refusal(scope)
            if refusal is None and (self.expected is not None and path not in self.PUBLIC
                                    and scope.get("method") != "OPTIONS"
                                    and not self._authorized(scope)):
                refusal = json_error(401, "invalid or missing API key (send 'Authorization: "
                                      "Bearer KEY')", "authentication_error",
                                      code="invalid_api_key")
            if refusal is not None:
                await refusal(scope, receive, counting_send)
                return
            await self.app(scope, counting_receive, counting_send)
        finally:
            route = path if path in self.routes else "other"
            self.state.http[(route, status)] += 1
            if received > LARGE_BODY_BYTES:
                # malloc_trim walks the heap: not on the event loop
                await run_in_threadpool(_give_back_memory)

    def _host_refusal(self, scope: Scope) -> Response | None:
        """None if the Host header names this server, else the error response."""
        if self.any_host:
            return None
        host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"),
                    None)
        if host is None:
            return json_error(400, "the request has no Host header", "invalid_request_error",
                               code="host_not_allowed")
        if host_name(host) in self.hosts:
            return None
        return json_error(403, f"host {host!r} is not allowed: this server answers requests "
                           f"for {', '.join(sorted(self.hosts))}; start it with "
                           f"--allowed-hosts NAME to accept another name ('*' = any)",
                           "permission_error", code="host_not_allowed")

    def _authorized(self, scope: Scope) -> bool:
        assert self.expected is not None
        if scope.get("path") == "/" and scope.get("method") in ("GET", "HEAD"):
            for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
                if key == "api_key":
                    return hmac.compare_digest(value.encode("latin-1"), self.expected)
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                token = _bearer_token(value)
                return token is not None and hmac.compare_digest(token, self.expected)
            if name == b"x-api-key":
                return hmac.compare_digest(value, self.expected)
        return False


def _give_back_memory() -> None:
    release_free_memory()
