"""Where a kernel runs, and the input checks every launcher shares."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # Triton ships for Linux x86-64 only; elsewhere the references run.
    HAS_TRITON = False

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def runs_triton(t: torch.Tensor) -> bool:
    """True where the Triton kernel runs: CUDA tensors, or CPU tensors under Triton's interpreter."""
    if not HAS_TRITON:
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Iterable[int] | None = None,
    dtypes: Iterable[torch.dtype] = FLOAT_DTYPES,
    like: torch.Tensor | None = None,
) -> torch.Tensor:
    """Validate one launcher argument; raise a ValueError that names it."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name}: expected rank {' or '.join(map(str, allowed))}, got shape {tuple(t.shape)}")
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {t.dtype} not supported (expected one of {', '.join(map(str, dtypes))})")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name}: on {t.device}, but the input is on {like.device}")
        if t.dtype != like.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from the input's {like.dtype}")
    return t
