"""The one-shot all-reduce for small sums on GPUs, opt-in with KERNL_ALL_REDUCE=one_shot: each rank copies its
partial into memory every rank of the host can read over NVLink (PyTorch symmetric memory), the ranks meet at a
barrier, and each sums all partials itself in rank order. One kernel and one barrier against NCCL's ring.

Not the default: measured on 2 H100s (BENCHMARKS.md, 2026-11-28), it halves an isolated captured all-reduce of
[1, 4096] bf16 (8.7 against 16.8 us) but inside a decode step NCCL's LL kernel takes 7.2 us and the one-shot 9.2,
and the 8B step is no faster. Kept for the A/B at 4 and more ranks, where NCCL's ring has more steps.

Sums over ONE_SHOT_MAX_BYTES (prefill) stay on NCCL. Every choice depends only on the tensor's shape and dtype and
on a setup all ranks agree on, so every rank takes the same path at the same call (a rank on one-shot with its
peer on NCCL would wait forever).

NVLink multicast (multimem) is never used: its operations need a multicast object, which kernl does not create.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

ONE_SHOT_MAX_BYTES = 256 * 1024  # decode up to batch 32 at hidden 4096 in bf16
_ALIGN = 16  # the kernel moves 16-byte vectors

_buffers: dict[tuple[int, torch.dtype], torch.Tensor | None] = {}  # None: NCCL for this device and dtype
_why: dict[str, str] = {}  # dtype → "one_shot" or why NCCL is used


def status() -> dict[str, str]:
    """Per dtype set up so far: "one_shot", or the reason its sums go through NCCL (for benchmarks and logs)."""
    return dict(_why)


def eligible(x: torch.Tensor) -> bool:
    """Whether x's sum may take the one-shot path (from its shape and dtype only, the same on every rank)."""
    nbytes = x.numel() * x.element_size()
    return x.device.type == "cuda" and 0 < nbytes <= ONE_SHOT_MAX_BYTES and nbytes % _ALIGN == 0


def one_shot_all_reduce(x: torch.Tensor) -> torch.Tensor | None:
    """The sum of the contiguous x over the default process group's ranks, in a new tensor; None when this sum is
    for NCCL (not asked for, too large, not on a GPU, or symmetric memory unavailable on these GPUs)."""
    if os.environ.get("KERNL_ALL_REDUCE", "nccl") != "one_shot" or not eligible(x):
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
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")  # no multicast object: we use none
    buffer, reason = None, "one_shot"
    try:
        from torch.distributed import _symmetric_memory as symm_mem

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
    except Exception as err:  # noqa: BLE001 - an optional fast path: NCCL remains
        buffer, reason = None, f"nccl ({type(err).__name__}: {err})"[:300]
    ok = torch.tensor([0 if buffer is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # all ranks take the path together
    if int(ok.item()) == 0 and buffer is not None:
        buffer, reason = None, "nccl (another rank could not set up symmetric memory)"
    _why[str(dtype).removeprefix("torch.")] = reason
    return buffer
