"""Counters for kernels whose last program to finish combines the others' partial results (split-K decode
attention): each program adds one when its part is written, and the one that sees the last arrival combines,
then puts the counter back to 0 for the next launch. No second kernel, no memset before each launch.

Launches that may run at the same time must not share counters. Eager launches on one stream run one after
another, so they share one set per (device, stream). A launch captured into a CUDA graph gets counters of its
own (graphs may be replayed on any stream), cut from a block zeroed before any capture: a capture that finds no
block, or too little left of it, gets None, and its caller combines in a separate kernel as before.
"""

from __future__ import annotations

import torch

CAPTURE_BLOCK = 1 << 18  # counters per device for captured launches: 1 MB

_eager: dict[tuple[int, int], torch.Tensor] = {}  # (device index, stream) → counters
_captured: dict[int, list] = {}  # device index → [block, first free counter]


def tickets(device: torch.device, n: int) -> torch.Tensor | None:
    """n int32 counters at 0 for one launch on device's current stream, or None (see the module docstring)."""
    if device.type != "cuda":
        return torch.zeros(n, dtype=torch.int32, device=device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch.cuda.is_current_stream_capturing():
        block = _captured.get(index)
        if block is None or block[1] + n > block[0].numel():
            return None
        start, block[1] = block[1], block[1] + n
        return block[0][start : start + n]
    key = (index, torch.cuda.current_stream(device).cuda_stream)
    have = _eager.get(key)
    if have is None or have.numel() < n:
        have = _eager[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    if index not in _captured:  # made outside any capture, before the first one can ask
        _captured[index] = [torch.zeros(CAPTURE_BLOCK, dtype=torch.int32, device=device), 0]
    return have[:n]
