"""kernl.serve.run: one process, uvicorn in front of the app; SIGINT/SIGTERM drain the queue, then exit."""

from __future__ import annotations

import os
from typing import Any


def run(
    bundle: str | os.PathLike | Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    graceful_timeout_s: float = 30.0,
    **options: Any,
) -> None:
    """Serve bundle (see kernl.serve.app for options) until SIGINT or SIGTERM.

    On a signal uvicorn stops accepting connections and waits up to graceful_timeout_s for the requests it
    holds; the app's lifespan then drains the batcher, so every queued request is answered."""
    from kernl.serve.asgi import app

    run_asgi(app(bundle, **options), host=host, port=port, log_level=log_level, graceful_timeout_s=graceful_timeout_s)


def run_asgi(
    application: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    graceful_timeout_s: float = 30.0,
) -> None:
    """Serve any ASGI application with the uvicorn settings `kernl serve` uses (the one owner of them, so
    benchmarks/serve_embeddings.py's HTTP floor runs on the very same HTTP stack). uvicorn picks its event loop
    and HTTP parser itself: uvloop and httptools when installed (the serve extra), else asyncio and h11."""
    import uvicorn

    config = uvicorn.Config(
        application,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=graceful_timeout_s,
    )
    uvicorn.Server(config).run()
