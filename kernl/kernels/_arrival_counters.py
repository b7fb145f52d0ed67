"""Zeroed int32 counters that a kernel's programs count their arrivals on, one buffer per device.

A kernel whose last program to arrive finishes the work (decode attention's combine) needs counters that are
zero when it starts, and it leaves them zero when it ends. They live for the process: a CUDA graph that
captured a launch keeps the buffer's address, so a buffer is never freed (a larger one replaces it for new
launches only), and a capture never allocates one: it would need a memset in every replay.
"""

from __future__ import annotations

import torch

MIN_COUNTERS = 1024  # 4 KB: every (row, kv head) of batch 128 x 8 kv heads without growing
_buffers: dict[torch.device, torch.Tensor] = {}
_replaced: list[torch.Tensor] = []  # still addressed by graphs captured before they were outgrown


def arrival_counters(device: torch.device, count: int) -> torch.Tensor | None:
    """At least count zeroed int32 counters on device; None during a CUDA graph capture that finds none large
    enough (the caller then takes a path without counters). Kernels sharing the buffer must not run at once."""
    buffer = _buffers.get(device)
    if buffer is not None and buffer.numel() >= count:
        return buffer
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    if buffer is not None:
        _replaced.append(buffer)
    size = max(MIN_COUNTERS, 1 << (count - 1).bit_length())
    _buffers[device] = torch.zeros(size, dtype=torch.int32, device=device)
    return _buffers[device]
