"""Prometheus metrics of one app (its own registry, so several apps in a process never clash)."""

from __future__ import annotations

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
