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
    import uvicorn

    from kernl.serve.asgi import app

    application = app(bundle, **options)
    config = uvicorn.Config(
        application,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=graceful_timeout_s,
    )
    uvicorn.Server(config).run()
