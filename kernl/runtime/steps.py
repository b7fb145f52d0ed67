"""What generation loops share, decoder-only and encoder-decoder alike: capturing a step into a CUDA graph, and
reading device values back without waiting for them now."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kernl.runtime.graphs import _own_cublas_workspace, _side_stream


def capture_step(
    run: Callable[[], Any], device: torch.device, pool: Any, rng: torch.Generator | None = None
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Warm run on the side stream, then capture run into pool; rng (a sampler's generator) is registered with
    the graph so each replay draws fresh numbers. Returns (graph, what run returned during capture)."""
    side = _side_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    if rng is not None:
        graph.register_generator_state(rng)
    _own_cublas_workspace()
    with torch.cuda.graph(graph, pool=pool, stream=side):
        out = run()
    torch.cuda.synchronize(device)
    return graph, out


def read_async(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
    """Host copies of tensors, and an event that marks them ready (no wait now); wait_read gives them."""
    if tensors[0].device.type != "cuda":
        return [t.clone() for t in tensors], None
    hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for host, t in zip(hosts, tensors):
        host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return hosts, event


def wait_read(read: tuple[list[torch.Tensor], torch.cuda.Event | None]) -> list[torch.Tensor]:
    values, event = read
    if event is not None:
        event.synchronize()
    return values
