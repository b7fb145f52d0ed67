"""The sum over ranks of a row-parallel output, the residual add and the RMS norm after it, as one op.

In a tensor-parallel decoder every row-parallel linear (attention out, MLP down) is followed by an all-reduce
and the next norm, which adds the residual. On GPUs whose ranks share a host, one kernel (_peer_norm_kernel)
does all three over NVLink: one launch, and one NVLink write latency (the rows are their own signal) where the
unfused path has a collective and a norm. Everywhere else (NCCL asked for, prefill rows, CPU and gloo, the
ranks-as-threads of a compile) the op is the all-reduce of kernels/collectives.py followed by rms_norm, with the
same results up to rounding.

KERNL_ALL_REDUCE decides as for the plain sum (kernels/peer_all_reduce.py), except that "auto" takes the fused
kernel from 2 ranks on. On 2 H200s (BENCHMARKS.md, 2026-11-28 seventh session), one call of [1, 4096] in bf16
chained in a CUDA graph: 3.4 µs, against 7.0 µs for the flag-and-fence protocol it replaced; Llama-8B geometry at
batch 1: 2.60-2.63 ms/token against 2.90. Reading every rank's place at once instead of one after the other
(eighth session, 4 H200s): 1.752 -> 1.719 ms/token at tp=4. KERNL_PEER_NORM=0 keeps the sum and the norm apart
(an A/B switch). At decode the linear before it usually writes the places itself: kernels/peer_linear_norm.py.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from kernl.kernels import collectives
from kernl.kernels._backend import HAS_TRITON, runs_triton
from kernl.kernels._custom_ops import custom_op
from kernl.kernels.peer_all_reduce import set_up_on_every_rank, wanted
from kernl.kernels.rms_norm import rms_norm

if HAS_TRITON:
    import triton

    from kernl.kernels import _peer_norm_kernel as _k
    from kernl.kernels._norm_kernel import as_rows, row_warps
    from kernl.kernels._pdl import pdl_options


# Read at import, changeable for tests and benchmarks; every rank must see the same value.
ENABLED = os.environ.get("KERNL_PEER_NORM", "1") != "0"
AUTO_MIN_RANKS = 2  # KERNL_ALL_REDUCE=auto takes the fused kernel from this many ranks on


class Workspace:
    """What the kernel needs on one device: every rank's workspace address and this rank's slot counters."""

    def __init__(self, bases: torch.Tensor, rank: int, keep: object = None, tile_for: int | None = None) -> None:
        self.bases = bases  # int64 [world], on the device
        self.rank = rank
        self.world = bases.numel()
        # Rows of the kernel's tile of places (a constexpr): world rounded up to a power of two, or that of the
        # ranks a one-rank workspace compiles for, so that the bundle ships the binary its ranks launch.
        self.tile_rows = 1 << ((tile_for or self.world) - 1).bit_length()
        self.counters = torch.zeros(_k.SLOTS, dtype=torch.int32, device=bases.device)
        self._keep = keep  # the memory behind the addresses

    @classmethod
    def local(cls, device: torch.device, dtype: torch.dtype, tile_for: int = 1) -> Workspace:
        """A workspace of one rank in ordinary memory: the kernel's sum is then its own partial. tile_for: the
        ranks whose kernel it runs (a compile's lone rank 0 standing for them)."""
        memory = empty_places(torch.empty(_k.WORKSPACE_BYTES, dtype=torch.uint8, device=device), dtype)
        bases = torch.tensor([memory.data_ptr()], dtype=torch.int64, device=device)
        return cls(bases, 0, keep=memory, tile_for=tile_for)


def empty_places(memory: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """memory (bytes) with every element of dtype marked empty (-0.0), as the kernel expects a workspace."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    view = torch.int16 if itemsize == 2 else torch.int32
    memory.view(view).fill_(_k.EMPTY_BITS[itemsize])
    return memory


# (device index, dtype) → this rank's workspace; None: the unfused path. A workspace holds one dtype's rows.
_workspaces: dict[tuple[int, torch.dtype], Workspace | None] = {}
_local: dict[tuple[str, torch.dtype, int], Workspace] = {}  # one-rank workspaces for compiles and tests
_why: dict[str, str] = {}  # device → "fused", or why its sums and norms stay apart


def status() -> dict[str, str]:
    """Per device set up so far: "fused", or the reason the kernel could not be used (for benchmarks and logs)."""
    return dict(_why)


def fusable(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes these (from shapes and dtypes only, the same on every rank)."""
    if not (HAS_TRITON and runs_triton(x)) or x.dim() < 1 or x.shape != residual.shape:
        return False
    n = x.shape[-1]
    rows = x.numel() // max(n, 1)
    return (
        0 < rows <= _k.SLOTS
        and 0 < n * x.element_size() <= _k.ROW_CAP_BYTES
        and x.dtype == residual.dtype
        and weight.shape == (n,)
    )


def launch(
    ws: Workspace,
    x: torch.Tensor | None,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel over ws: (rms_norm(sum over ranks of x + residual), that sum + residual). x None: the rows are
    in ws's places already, every rank's, written by _gemv_push_kernel (the kernel's PUSHED mode)."""
    n = residual.shape[-1]
    r2 = as_rows(residual)
    x2 = as_rows(x) if x is not None else r2
    y, s = torch.empty_like(residual), torch.empty_like(residual)
    y2, s2 = y.view(-1, n), s.view(-1, n)
    block_n = triton.next_power_of_2(n)
    _k.peer_add_rms_norm_kernel[(r2.shape[0],)](
        x2,
        r2,
        weight,
        y2,
        s2,
        x2.stride(0),
        r2.stride(0),
        y2.stride(0),
        s2.stride(0),
        ws.bases,
        ws.counters,
        ws.rank,
        ws.world,
        n,
        eps,
        weight_offset,
        ON_GPU=residual.is_cuda,
        BLOCK_N=block_n,
        WORLD_P2=ws.tile_rows,
        num_warps=row_warps(block_n),
        PUSHED=x is None,
        **pdl_options(r2),
    )
    return y, s


def all_reduce_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(total), total) where total = the sum of x over ranks + residual. x: [..., hidden], a fresh
    row-parallel output nothing else reads (the unfused path sums it in place); residual: like x."""
    ws = workspace_for(x) if fusable(x, residual, weight) else None
    if ws is None:
        return rms_norm(collectives.all_reduce(x), weight, eps, residual=residual, weight_offset=weight_offset)
    return launch(ws, x, residual, weight, eps, weight_offset)


def workspace_for(x: torch.Tensor) -> Workspace | None:
    """The workspace of x's device and dtype (set up at the first call, a collective), None where the sum and the
    norm stay apart: ranks as threads, one rank, CPU, KERNL_ALL_REDUCE or KERNL_PEER_NORM asking for it."""
    ranks = collectives.thread_ranks()
    if ranks is not None:
        # Ranks as threads sum through collectives; a lone rank 0 (the compile's warm-up) runs the kernel over
        # a one-rank workspace, so the bundle ships it compiled as every rank will launch it.
        return _local_workspace(x.device, x.dtype, ranks.stands_for) if ranks.world_size == 1 and x.is_cuda else None
    world = collectives.world_size()
    if world == 1 or not x.is_cuda or not ENABLED or not wanted(world, AUTO_MIN_RANKS):
        return None
    key = (x.device.index, x.dtype)
    if key not in _workspaces:
        if torch.cuda.is_current_stream_capturing():
            return None  # the setup is collective and allocates: never inside a capture
        _workspaces[key] = _set_up(x.device, x.dtype)
    return _workspaces[key]


def _local_workspace(device: torch.device, dtype: torch.dtype, tile_for: int) -> Workspace:
    key = (str(device), dtype, tile_for)
    if key not in _local:
        _local[key] = Workspace.local(device, dtype, tile_for)
    return _local[key]


def _set_up(device: torch.device, dtype: torch.dtype) -> Workspace | None:
    """This rank's workspace in symmetric memory, exchanged with every rank (a collective) and checked on a
    probe; None on every rank when any rank could not make it, or its probe came out wrong."""

    def make() -> Workspace:
        from torch.distributed import _symmetric_memory as symm_mem  # inside: a missing module is a fallback

        memory = empty_places(symm_mem.empty(_k.WORKSPACE_BYTES, dtype=torch.uint8, device=device), dtype)
        handle = symm_mem.rendezvous(memory, dist.group.WORLD)
        torch.cuda.synchronize(device)
        dist.barrier()  # every rank's places are empty before any rank writes into them
        bases = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=device)
        ws = Workspace(bases, handle.rank, keep=(memory, handle))
        _check_probe(ws, device, dtype)
        return ws

    ws, _why[str(device)] = set_up_on_every_rank(device, make, done="fused", otherwise="apart")
    return ws


def _check_probe(ws: Workspace, device: torch.device, dtype: torch.dtype) -> None:
    """Two rows of rank + 1, twice (both halves of the slots): the sums must be 1 + 2 + ... + world."""
    want = ws.world * (ws.world + 1) // 2
    for _ in range(2):
        x = torch.full((2, 64), ws.rank + 1, dtype=dtype, device=device)
        _, total = launch(ws, x, torch.zeros_like(x), torch.ones(64, dtype=dtype, device=device), 1e-6)
        if not bool((total == want).all()):
            raise RuntimeError(f"a probe summed to {total[0, 0].item()}, expected {want}")


def all_reduce_add_rms_norm_call(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    return all_reduce_add_rms_norm(x, residual, weight, eps, weight_offset)


def _functional(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    return all_reduce_add_rms_norm(x.clone(), residual, weight, eps, weight_offset)  # the op must not write x


all_reduce_add_rms_norm_op = custom_op("kernl::all_reduce_add_rms_norm", _functional, mutates_args=())


@all_reduce_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, weight_offset=0.0):
    return torch.empty_like(x), torch.empty_like(x)
