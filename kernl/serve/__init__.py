"""Serving bundles over HTTP: `kernl serve BUNDLE`, kernl.serve.app(bundle) (an ASGI app), Ray Serve replicas.

Needs the serve extra: pip install 'kernl[serve]' (FastAPI, uvicorn, prometheus_client; orjson for faster JSON,
optional); Ray Serve replicas also need 'kernl[ray]'. The runtime (kernl.load) never imports this package.
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as err:
    raise ImportError(
        f"kernl.serve needs FastAPI, uvicorn and prometheus_client ({err.name} is missing): pip install 'kernl[serve]'"
    ) from None

from kernl.serve.asgi import app
from kernl.serve.options import ServeOptions
from kernl.serve.ray import ray_deployment
from kernl.serve.server import run

__all__ = ["ServeOptions", "app", "ray_deployment", "run"]
