"""The one-shot all-reduce for small sums on GPUs: each rank copies its partial into memory every rank of the host
can read over NVLink (PyTorch symmetric memory), the ranks meet at a barrier, and each sums all partials itself in
rank order. One kernel and one barrier against NCCL's ring.

KERNL_ALL_REDUCE picks the path: "auto" (the default) takes the one-shot at 4 or more ranks and NCCL at 2;
"one_shot" or "nccl" force one. (The sums fused with the norm after them, kernels/peer_norm.py, go over peer
memory from 2 ranks on under "auto".) Measured (BENCHMARKS.md, 2026-11-28): at 4 H200s the Llama-8B decode step is
2.225 ms on the one-shot against 2.487 on NCCL; at 2 ranks the two are within 3% (H200: 3.009 against 3.090; H100,
before the GEMV: 4.148 against 4.096), so 2 ranks keep NCCL.

Sums over ONE_SHOT_MAX_BYTES (prefill) stay on NCCL. Every choice depends only on the tensor's shape and dtype and
on a setup all ranks agree on (the world size included), so every rank takes the same path at the same call (a rank
on one-shot with its peer on NCCL would wait forever).

NVLink multicast (multimem) is never used: its operations need a multicast object, which kernl does not create.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from kernl.errors import KernlError

ONE_SHOT_MAX_BYTES = 256 * 1024  # decode up to batch 32 at hidden 4096 in bf16
_ALIGN = 16  # the kernel moves 16-byte vectors
AUTO_MIN_RANKS = 4  # "auto" takes the one-shot from this many ranks on
PATHS = ("auto", "one_shot", "nccl")

_buffers: dict[tuple[int, torch.dtype], torch.Tensor | None] = {}  # None: NCCL for this device and dtype
_why: dict[str, str] = {}  # dtype → "one_shot" or why NCCL is used


def status() -> dict[str, str]:
    """Per dtype set up so far: "one_shot", or the reason its sums go through NCCL (for benchmarks and logs)."""
    return dict(_why)


def eligible(x: torch.Tensor) -> bool:
    """Whether x's sum may take the one-shot path (from its shape and dtype only, the same on every rank)."""
    nbytes = x.numel() * x.element_size()
    return x.device.type == "cuda" and 0 < nbytes <= ONE_SHOT_MAX_BYTES and nbytes % _ALIGN == 0


def wanted(world: int, auto_min_ranks: int = AUTO_MIN_RANKS) -> bool:
    """Whether KERNL_ALL_REDUCE asks for the path over peer memory at this world size (the same answer on every
    rank); "auto" takes it from auto_min_ranks ranks on."""
    path = os.environ.get("KERNL_ALL_REDUCE", "auto")
    if path not in PATHS:
        raise KernlError(f"KERNL_ALL_REDUCE={path!r}: expected one of {', '.join(PATHS)}")
    return path == "one_shot" or (path == "auto" and world >= auto_min_ranks)


def one_shot_all_reduce(x: torch.Tensor) -> torch.Tensor | None:
    """The sum of the contiguous x over the default process group's ranks, in a new tensor; None when this sum is
    for NCCL (not asked for, too large, not on a GPU, or symmetric memory unavailable on these GPUs)."""
    if not eligible(x) or not wanted(dist.get_world_size()):
        return None
    key = (x.device.index, x.dtype)
    if key not in _buffers:
        if torch.cuda.is_current_stream_capturing():
            return None  # the setup is collective and allocates: never inside a capture (NCCL serves this one)
        _buffers[key] = _set_up(x.device, x.dtype)
    buffer = _buffers[key]
    if buffer is None:
        return None
    if x.data_ptr() % _ALIGN:
        x = x.clone()  # fresh allocations are aligned; the decision above never depends on addresses
    out = torch.empty_like(x)
    group = dist.group.WORLD.group_name
    torch.ops.symm_mem.one_shot_all_reduce_copy_out(buffer[: x.numel()].view_as(x), x, "sum", group, out)
    return out


def _set_up(device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """This device's buffer for dtype, made and exchanged with every rank (a collective); None on every rank
    when any rank could not make it, or when the one-shot sum of a probe comes out wrong."""

    def make() -> torch.Tensor:
        from torch.distributed import _symmetric_memory as symm_mem  # inside: a missing module is a fallback

        itemsize = torch.empty((), dtype=dtype).element_size()
        buffer = symm_mem.empty(ONE_SHOT_MAX_BYTES // itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(buffer, dist.group.WORLD)
        probe = torch.full((64,), dist.get_rank() + 1, dtype=dtype, device=device)
        out = torch.empty_like(probe)
        group = dist.group.WORLD.group_name
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(buffer[:64], probe, "sum", group, out)
        world = dist.get_world_size()
        if not bool((out == world * (world + 1) // 2).all()):
            raise RuntimeError(f"a probe summed to {out[0].item()}")
        return buffer

    buffer, reason = set_up_on_every_rank(device, make, done="one_shot", otherwise="nccl")
    _why[str(dtype).removeprefix("torch.")] = reason
    return buffer


T = TypeVar("T")


def set_up_on_every_rank(
    device: torch.device, make: Callable[[], T], *, done: str, otherwise: str
) -> tuple[T | None, str]:
    """make() on every rank (a collective: it allocates symmetric memory and meets the other ranks), then the ranks
    agree: (its result, done) where every rank succeeded, else (None, why) on every rank, why starting with
    otherwise (the path taken instead)."""
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")  # no multicast object: we use none
    result, reason = None, done
    try:
        result = make()
    except Exception as err:  # noqa: BLE001 - an optional fast path: the other one remains
        result, reason = None, f"{otherwise} ({type(err).__name__}: {err})"[:300]
    ok = torch.tensor([0 if result is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # all ranks take the path together
    if int(ok.item()) == 0 and result is not None:
        result, reason = None, f"{otherwise} (another rank could not set up symmetric memory)"
    return result, reason
