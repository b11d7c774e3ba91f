"""``pyllm serve``: the OpenAI-compatible HTTP server (needs ``pip install "pyllm[server]"``).

The server starts listening at once and loads the model on a thread (``/health`` answers 503
until it is ready). SIGTERM / Ctrl-C stop accepting connections, let running generations finish
for up to ``--shutdown-timeout`` seconds, then cancel what is left (those clients get a
"shutting down" error).
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import Any

from pyllm.cli.common import add_model_args, positive_int
from pyllm.errors import PyllmError


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
    g.add_argument("--kv-type", choices=("f16", "q8_0", "f32"), default="f16",
                   help="KV cache type (default f16)")
    g.add_argument("--max-body", type=positive_int, default=1 << 20, metavar="BYTES",
                   help="largest request body accepted (default 1 MiB; larger gets 413)")
    g.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                   help="seconds running requests may take to finish on SIGTERM (10)")
    p.set_defaults(run=run, parser=p)


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    try:
        import uvicorn

        from pyllm.server.app import ServerConfig, cancel_all, create_app
    except ImportError as e:
        raise PyllmError(f"the server needs extra packages ({e.name} is missing): "
                         f"pip install 'pyllm[server]'") from None
    from pyllm.models import resolve_model_path

    if args.chat_format is not None:
        from pyllm.chat import get_format

        get_format(args.chat_format)  # an unknown name fails now, not on the first request
    model_path = Path(resolve_model_path(args.model, quiet=False))
    config = ServerConfig(model_id=args.alias or model_path.name, api_key=args.api_key,
                          cors_origins=list(args.cors), chat_format=args.chat_format,
                          max_body_bytes=args.max_body)

    def load() -> Any:
        from pyllm.model import LLM
        from pyllm.server.engine import Engine

        # The LLM's own single-sequence context is not used by the server: keep it tiny; the
        # engine allocates --parallel slots of -c tokens each.
        llm = LLM(model_path, n_ctx=min(args.ctx_size, 64), n_threads=args.threads,
                  n_batch=args.batch_size)
        llm.tokenizer  # noqa: B018 - build the tokenizer now, not on the first request
        engine = Engine(llm, n_parallel=args.parallel, n_ctx=args.ctx_size,
                        n_batch=args.batch_size, kv_type=args.kv_type, max_queue=args.queue)
        print(f"pyllm: serving {model_path.name}: {args.parallel} slots x {args.ctx_size} "
              f"tokens, {llm.n_threads} threads", file=sys.stderr, flush=True)
        return engine

    app = create_app(config, loader=load)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"pyllm: warning: listening on {args.host} without --api-key", file=sys.stderr)

    class Server(uvicorn.Server):
        """On SIGTERM / Ctrl-C uvicorn stops accepting and waits for open requests; after
        --shutdown-timeout the engine cancels what is left, so those requests end with a
        'shutting down' error rather than uvicorn cutting their connections."""

        timer: threading.Timer | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            if self.timer is None:
                self.timer = threading.Timer(args.shutdown_timeout, cancel_all, (app,))
                self.timer.daemon = True
                self.timer.start()

    # uvicorn's own limit is only the backstop, should the cancelled requests not end
    uv = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                        timeout_graceful_shutdown=args.shutdown_timeout + 10, access_log=False)
    server = Server(uv)
    print(f"pyllm: listening on http://{args.host}:{args.port} (loading the model)",
          file=sys.stderr, flush=True)
    server.run()
    return 0
