"""Per-row decoder positions for BART-like decoders during export.

A BART-like decoder (BART, mBART, Marian, Pegasus, PLBart…) computes its positions inside the model, as
arange(seq) + the cache's length, and embeds them with `embed_positions`, an nn.Embedding (learned, with an
`offset` of 2 in BART/mBART, or a fixed sinusoidal table in Marian/Pegasus). Its forward takes no position ids,
yet a decode step needs each row's own position. While one decoder call runs, `fed_positions` swaps that
module's forward for a lookup of the given per-row positions (+ its offset); the module is restored on exit, so
nothing stays patched and the exported graph reads the positions as an input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def position_embedding(model: torch.nn.Module) -> torch.nn.Embedding | None:
    """The decoder's position-embedding table when it is a plain lookup by position (+ offset), else None."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    module = getattr(decoder, "embed_positions", None)
    if not isinstance(module, torch.nn.Embedding) or module.padding_idx is not None:
        return None
    offset = getattr(module, "offset", 0)
    return module if isinstance(offset, int) and not isinstance(offset, bool) else None


@contextlib.contextmanager
def fed_positions(model: torch.nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, the decoder's position embedding returns table[positions + offset] ([b, s, d]),
    whatever the decoder passes it. positions: [b, s] int64."""
    module = position_embedding(model)
    if module is None:
        raise ValueError(f"{type(model).__name__}: its decoder has no position-embedding table to feed")
    offset = getattr(module, "offset", 0)

    def lookup(*args, **kwargs) -> torch.Tensor:
        return torch.nn.functional.embedding(positions + offset, module.weight)

    had = "forward" in module.__dict__
    saved = module.__dict__.get("forward")
    module.forward = lookup
    try:
        yield
    finally:
        if had:
            module.forward = saved
        else:
            del module.forward
