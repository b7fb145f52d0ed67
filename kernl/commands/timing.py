"""Latency of a callable: median of many runs after warm-up; CUDA events on a GPU, perf_counter on CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, runs: int) -> float:
    """Each run starts on an idle device, so launch overhead on the host counts as it does for a caller."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_us_per_call(fn: Callable[[], object], launches: int = 20) -> float:
    """GPU µs per call of fn: `launches` calls captured in one CUDA graph, median of its replays, so that host
    launch overhead does not count (kernel benchmarks)."""
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        for _ in range(launches):
            fn()
    return median_ms(graph.replay, torch.device("cuda"), warmup=5, runs=50) * 1e3 / launches
