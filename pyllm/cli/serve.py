"""``pyllm serve``: the OpenAI-compatible HTTP server (needs ``pip install "pyllm[server]"``).

What can be checked cheaply is checked before anything is announced: the model file can be
opened, the address can be bound (the socket is bound here and handed to uvicorn, so a port in
use is one ``error:`` line and ``--port 0`` reports the port it got). Then the server starts
listening and loads the model on a thread (``/health`` answers 503 until it is ready); if the
load fails, the server stops and the command ends with the load error (exit 1).

SIGTERM / Ctrl-C stop accepting connections, let running generations finish for up to
``--shutdown-timeout`` seconds, then cancel what is left (those clients get a "shutting down"
error).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pyllm.cli.common import (
    add_model_args,
    add_speculative_args,
    count,
    lora_specs,
    ngram_factory,
    positive_int,
)
from pyllm.errors import PyllmError
from pyllm.runtime.footprint import DEFAULT_KV_TYPE, KV_ELEMENT_TYPES

WILDCARD_HOSTS = ("", "0.0.0.0", "::")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="Serve the model over an OpenAI-compatible HTTP API "
                       "(/v1/completions, /v1/chat/completions, ...) with a chat page at /. "
                       "Up to --parallel requests decode together in one batched forward.")
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    g.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health and "
                   "the chat page (which asks for the key)")
    g.add_argument("--parallel", "-np", type=positive_int, default=4, metavar="N",
                   help="sequences decoded together, each with its own -c context (default 4)")
    g.add_argument("--queue", type=positive_int, default=64, metavar="N",
                   help="requests that may wait for a slot before new ones get 503 (64)")
    g.add_argument("--chat-format", metavar="NAME",
                   help="built-in chat format instead of the model's template")
    g.add_argument("--alias", metavar="NAME",
                   help="model id reported by /v1/models (default: the file name)")
    g.add_argument("--cors", nargs="+", metavar="ORIGIN", default=[],
                   help="allow cross-origin requests from these origins ('*' = any); "
                   "off by default")
    g.add_argument("--allowed-hosts", nargs="+", metavar="NAME", default=[],
                   help="Host header names accepted besides localhost, 127.0.0.1, ::1 and the "
                   "--host address ('*' = any); other names get 403, which stops web pages "
                   "from reaching the server by DNS rebinding")
    g.add_argument("--kv-type", choices=tuple(KV_ELEMENT_TYPES), default=DEFAULT_KV_TYPE,
                   help=f"KV cache type (default {DEFAULT_KV_TYPE})")
    g.add_argument("--max-body", type=positive_int, default=1 << 20, metavar="BYTES",
                   help="largest request body accepted (default 1 MiB; larger gets 413)")
    g.add_argument("--cache-ram", type=count, default=1024, metavar="MIB",
                   help="host memory for the caches of reused slots, so a returning prompt "
                   "skips its cached prefix (LRU; 0 = off; default 1024)")
    g.add_argument("--slot-save-path", metavar="DIR",
                   help="folder for POST /slots/{id}?action=save|restore state files (off "
                   "without it)")
    g.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                   help="seconds running requests may take to finish on SIGTERM (10)")
    add_speculative_args(p)
    p.set_defaults(run=run, parser=p)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (not yet listening), or a PyllmError saying why not."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise PyllmError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, type_, proto, _, address = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        # as uvicorn does: a restart may reuse the port while old connections are in TIME_WAIT
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise PyllmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _check_readable(path: Path) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        raise PyllmError(f"{path}: cannot open: {e.strerror or e}") from None


def make_server(app: Any, shutdown_timeout: float,
                on_stopped: Callable[[], None] | None = None) -> Any:
    """The uvicorn server for ``app`` (made by :func:`pyllm.server.app.create_app`). On SIGTERM /
    Ctrl-C uvicorn stops accepting and waits for open requests; after ``shutdown_timeout``
    seconds the engine cancels what is left, so those requests end with a 'shutting down' error
    rather than uvicorn cutting their connections. Without ``on_stopped`` uvicorn then ends the
    process by the signal it caught; with it (an MPI pipeline: it tells the workers to exit)
    the process exits normally after it, so that every rank ends MPI cleanly."""
    import uvicorn

    from pyllm.server.app import cancel_all

    class Server(uvicorn.Server):
        timer: threading.Timer | None = None

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                try:
                    yield
                finally:
                    if on_stopped is not None:
                        on_stopped()
                        # uvicorn would raise the signal again: that rank would die without
                        # ending MPI, and mpirun would call the drained stop a failure
                        getattr(self, "_captured_signals", []).clear()

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            if self.timer is None:
                self.timer = threading.Timer(shutdown_timeout, cancel_all, (app,))
                self.timer.daemon = True
                self.timer.start()

    # uvicorn's own limit is only the backstop, should the cancelled requests not end
    return Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                 timeout_graceful_shutdown=shutdown_timeout + 10))


def load_engine(model_path: Path, args: argparse.Namespace) -> Any:
    """The batching engine for ``pyllm serve``: the loaded model and one context of --parallel
    slots of -c tokens each (no single-sequence context: the server would never use it)."""
    from pyllm.runtime.loaded import LoadedModel
    from pyllm.server.engine import Engine

    model = LoadedModel(model_path, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                        device=args.device, pipeline=args.pipeline)
    try:
        model.tokenizer  # noqa: B018 - build the tokenizer now, not on the first request
        return Engine(model, n_parallel=args.parallel, n_ctx=args.ctx_size,
                      n_batch=args.batch_size, kv_type=args.kv_type, max_queue=args.queue,
                      lora=lora_specs(args.parser, args),
                      drafter=getattr(args, "drafter_factory", None),
                      draft_model=args.draft_model, draft_max=args.draft_max,
                      draft_p_min=args.draft_p_min,
                      cache_ram_mib=args.cache_ram)
    except BaseException:
        model.close()
        raise


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if args.shutdown_timeout < 0:
        parser.error(f"--shutdown-timeout must be 0 or more, got {args.shutdown_timeout}")
    args.drafter_factory = ngram_factory(parser, args)  # bad settings: a usage error, now
    if args.draft_model is not None:
        _check_readable(Path(args.draft_model))
    if args.slot_save_path is not None and not Path(args.slot_save_path).is_dir():
        raise PyllmError(f"--slot-save-path {args.slot_save_path}: not a folder")
    try:
        import uvicorn  # noqa: F401 - only to say early that it is missing

        from pyllm.server.app import ServerConfig, create_app
    except ImportError as e:
        raise PyllmError(f"the server needs extra packages ({e.name} is missing): "
                         f"pip install 'pyllm[server]'") from None
    from pyllm.runtime.default_model import resolve_model_path

    if args.chat_format is not None:
        from pyllm.chat import get_format

        get_format(args.chat_format)  # an unknown name fails now, not on the first request
    model_path = Path(resolve_model_path(args.model, quiet=False))
    _check_readable(model_path)  # the rest of a bad model is found by the load below
    allowed = list(args.allowed_hosts)
    if args.host not in WILDCARD_HOSTS:
        allowed.append(args.host)
    config = ServerConfig(model_id=args.alias or model_path.name, api_key=args.api_key,
                          cors_origins=list(args.cors), chat_format=args.chat_format,
                          max_body_bytes=args.max_body, allowed_hosts=allowed,
                          slot_save_path=args.slot_save_path)
    failure: list[BaseException] = []  # the load error, once the server has stopped for it
    server: Any = None

    def load() -> Any:
        return load_engine(model_path, args)

    def ready(engine: Any) -> None:
        print(f"pyllm: serving {model_path.name}: {engine.n_parallel} slots x {engine.n_ctx} "
              f"tokens, {engine.n_threads} threads", file=sys.stderr, flush=True)

    def load_or_stop() -> Any:
        try:
            return load()
        except BaseException as e:
            # a server that can never answer is no use: stop it, and exit with this error
            failure.append(e)
            server.should_exit = True
            raise

    app = create_app(config, loader=load_or_stop, on_ready=ready)
    server = make_server(app, args.shutdown_timeout, on_stopped=(
        args.pipeline.shutdown if args.pipeline is not None else None))
    sock = bind_socket(args.host, args.port)
    if args.host not in LOOPBACK_NAMES and not args.api_key:
        print(f"pyllm: warning: listening on {args.host} without --api-key", file=sys.stderr)
    if args.host in WILDCARD_HOSTS and "*" not in allowed:
        print("pyllm: note: only requests addressed to localhost, 127.0.0.1 or ::1 are "
              "answered; name the others with --allowed-hosts NAME... ('*' = any)",
              file=sys.stderr)
    print(f"pyllm: listening on {_url(sock)} (loading the model)", file=sys.stderr, flush=True)
    with sock:
        server.run(sockets=[sock])
    if failure:
        raise failure[0]
    return 0
