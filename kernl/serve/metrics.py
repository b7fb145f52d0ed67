"""Prometheus metrics of one app (its own registry, so several apps in a process never clash)."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Queue length, rows and requests a bundle call, call and request latency, requests by endpoint and status."""

    def __init__(self, max_rows: int) -> None:
        self.registry = CollectorRegistry()
        sizes = [1]
        while sizes[-1] < max_rows:
            sizes.append(min(sizes[-1] * 2, max_rows))
        self.queue = Gauge("kernl_queue_length", "requests waiting for a bundle call", registry=self.registry)
        self.in_flight = Gauge(
            "kernl_requests_in_flight", "requests received, not yet answered", registry=self.registry
        )
        self.batch_rows = Histogram(
            "kernl_batch_size", "rows (texts) in one bundle call", buckets=sizes, registry=self.registry
        )
        self.batch_requests = Histogram(
            "kernl_batch_requests", "requests merged into one bundle call", buckets=sizes, registry=self.registry
        )
        self.call_seconds = Histogram(
            "kernl_batch_seconds", "time of one bundle call", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.latency = Histogram(
            "kernl_request_seconds",
            "time from a request's arrival to its answer",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter("kernl_requests", "requests answered", ["endpoint", "status"], registry=self.registry)
        self.generation = GenerationMetrics(self.registry)

    # The batcher's observer (kernl.serve.batcher.BatchObserver).
    def queued(self, length: int) -> None:
        self.queue.set(length)

    def batch(self, rows: int, requests: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)
        self.call_seconds.observe(seconds)

    def answered(self, endpoint: str, status: int, seconds: float) -> None:
        self.latency.labels(endpoint).observe(seconds)
        self.requests.labels(endpoint, str(status)).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)


class GenerationMetrics:
    """Continuous batching: rows generating, tokens produced (and their rate), time to first token, and how many
    requests joined a batch while other rows were decoding."""

    WINDOW_S = 10.0  # the tokens/s gauge is the rate over this window

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.active_rows = Gauge("kernl_generation_active_rows", "rows generating in the decode batch", registry=r)
        self.tokens = Counter("kernl_generation_tokens", "tokens generated", registry=r)
        self.rate = Gauge(
            "kernl_generation_tokens_per_second", f"tokens generated a second over the last {self.WINDOW_S:g} s",
            registry=r,
        )  # fmt: skip
        self.first_token = Histogram(
            "kernl_generation_time_to_first_token_seconds",
            "time from a request's arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.admitted = Counter("kernl_generation_admitted", "requests admitted into the decode batch", registry=r)
        self.joined = Counter(
            "kernl_generation_joined", "requests admitted while other rows were mid-decode (continuous batching)",
            registry=r,
        )  # fmt: skip
        self.steps = Counter("kernl_generation_steps", "decode steps run", registry=r)
        self.step_rows = Histogram(
            "kernl_generation_step_rows", "rows generating in one decode step", buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )  # fmt: skip
        self._recent: deque[tuple[float, int]] = deque()

    def admit(self, requests: int, running: int) -> None:
        self.admitted.inc(requests)
        if running:
            self.joined.inc(requests)

    def step(self, rows: int, tokens: int, active: int) -> None:
        """One worker call: rows in its decode step (0 when none ran), tokens delivered, rows active after it."""
        if rows:
            self.steps.inc()
            self.step_rows.observe(rows)
        self.active_rows.set(active)
        if tokens:
            self.tokens.inc(tokens)
            self._recent.append((time.monotonic(), tokens))

    def first(self, seconds: float) -> None:
        self.first_token.observe(seconds)

    def refresh(self) -> None:
        """Update the tokens/s gauge (before /metrics answers)."""
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - self.WINDOW_S:
            self._recent.popleft()
        self.rate.set(sum(n for _, n in self._recent) / self.WINDOW_S)
