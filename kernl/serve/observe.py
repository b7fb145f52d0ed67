"""ASGI middleware: each request's latency and status into the app's metrics, and the API requests in flight."""

from __future__ import annotations

import time

from kernl.serve.metrics import Metrics


class Observe:
    def __init__(self, app, metrics: Metrics, endpoints: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints  # paths reported by name; any other path counts as "other"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"
        api = scope.get("method") == "POST" and path.startswith("/v1/")

        async def observed_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if api:
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            if api:
                self.metrics.in_flight.dec()
            self.metrics.answered(endpoint, status, time.perf_counter() - start)
