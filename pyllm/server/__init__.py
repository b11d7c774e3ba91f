"""``pyllm serve``: an OpenAI-compatible HTTP server with continuous batching.

:mod:`pyllm.server.engine` batches many requests into one forward per step (no web dependency);
:mod:`pyllm.server.app` is the FastAPI application (``pip install "pyllm[server]"``).
"""

from __future__ import annotations
