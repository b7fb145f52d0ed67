"""Collectives of a tensor-parallel program: the sum over ranks after each row-parallel linear (and after a
vocabulary-parallel embedding's lookup), and the gather of a vocabulary-parallel LM head's logits.

torch.distributed does the work (NCCL on GPUs, gloo on CPU), over the default process group. On the
current CUDA stream, NCCL's all_reduce is captured by a CUDA graph like any kernel, so a rank's graph holds
its reductions and replays them without the host. Small sums on GPUs may take a one-shot path over NVLink instead
(kernels/peer_all_reduce.py says when: KERNL_ALL_REDUCE). On one process (no group, or a group of one) the sum is
the tensor itself.

For checks at compile time, the ranks can also be threads of one process (ThreadRanks): each thread runs
its rank's program, and all_reduce sums the threads' tensors.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from kernl.kernels._custom_ops import custom_op
from kernl.kernels.peer_all_reduce import one_shot_all_reduce

_thread = threading.local()  # .ranks, .rank: set by ThreadRanks.run in the threads it starts


def thread_ranks() -> ThreadRanks | None:
    """The ranks-as-threads this thread runs in (a compile's check), or None in a rank's own process."""
    return getattr(_thread, "ranks", None)


def world_size() -> int:
    """Ranks in the default process group; 1 when there is none."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over the ranks of the default process group: the returned tensor, which may be x itself,
    overwritten (NCCL sums in place; the one-shot path writes a new tensor).

    x: any shape, the same on every rank. The sharding pass calls it on a row-parallel linear's fresh
    output, which nothing else reads: summing in place spares a copy of every partial on every layer.
    """
    ranks = getattr(_thread, "ranks", None)
    if ranks is not None:
        return ranks.all_reduce(x)
    if world_size() == 1:
        return x
    if not x.is_contiguous():
        raise ValueError(f"x: all_reduce sums contiguous tensors in place, got strides {x.stride()}")
    summed = one_shot_all_reduce(x)
    if summed is not None:
        return summed
    dist.all_reduce(x, op=dist.ReduceOp.SUM)  # synchronous: on CUDA it is queued on the current stream
    return x


def all_reduce_reference(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks into a new tensor (x is left as it was)."""
    return all_reduce(x.clone())


def all_reduce_call(x: torch.Tensor) -> torch.Tensor:
    return all_reduce(x)


# The registered op is functional for torch (its output must not alias its input): it sums into a copy.
# Bundles call all_reduce_call (kernels/direct.py), which sums in place.
all_reduce_op = custom_op("kernl::all_reduce", all_reduce_reference, mutates_args=())


@all_reduce_op.register_fake
def _(x):
    return torch.empty_like(x)


def all_gather(x: torch.Tensor, world: int) -> torch.Tensor:
    """The ranks' x side by side along the last dim, in rank order: [..., n] on each rank → [..., world * n].

    x: any shape, the same on every rank. world: the number of ranks, written into the program by the sharding
    pass (it fixes the output's shape); a process group of another size raises ValueError. The vocabulary-parallel
    LM head gathers each rank's slice of the logits with it.
    """
    ranks = getattr(_thread, "ranks", None)
    if ranks is not None:
        return ranks.all_gather(x, world)
    got = world_size()
    if got != world:
        raise ValueError(f"world: the program gathers over {world} ranks, the process group has {got}")
    if world == 1:
        return x.clone()
    x = x.contiguous()
    out = torch.empty((world, *x.shape), dtype=x.dtype, device=x.device)
    if dist.get_backend() == "nccl":
        dist.all_gather_into_tensor(out, x)  # one collective, captured by a CUDA graph like all_reduce
    else:
        dist.all_gather(list(out.unbind(0)), x)
    return out.movedim(0, -2).reshape(*x.shape[:-1], world * x.shape[-1])


def all_gather_call(x: torch.Tensor, world: int) -> torch.Tensor:
    return all_gather(x, world)


all_gather_op = custom_op("kernl::all_gather", all_gather, mutates_args=())


@all_gather_op.register_fake
def _(x, world):
    return x.new_empty((*x.shape[:-1], world * x.shape[-1]))


class ThreadRanks:
    """world_size ranks as threads of this process, for checking a sharded program where it is compiled.

    run(fn) calls fn(rank) in one thread per rank and returns the results in rank order; inside, all_reduce
    sums the ranks' tensors in rank order, so every rank gets the same values. A rank that raises makes the
    others fail at their next all_reduce (no wait forever), and run raises its error.
    """

    def __init__(self, world_size: int, timeout_s: float = 600.0, stands_for: int | None = None) -> None:
        self.world_size = world_size
        # The ranks the program is split for: a lone rank 0 compiling the kernels stands for all of them, and
        # kernels specialised on the world size compile for theirs.
        self.stands_for = stands_for or world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout_s)
        self._parts: list = [None] * world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self._parts[_thread.rank] = x
        self._barrier.wait()
        total = self._parts[0].clone()
        for part in self._parts[1:]:
            total += part
        self._barrier.wait()  # no rank overwrites its part before every rank has read them all
        x.copy_(total)  # in place, as the process-group sum
        return x

    def all_gather(self, x: torch.Tensor, world: int) -> torch.Tensor:
        if self.world_size == 1:  # rank 0 alone, compiling the kernels: its slice stands for every rank's
            return torch.cat([x] * world, dim=-1)
        if world != self.world_size:
            raise ValueError(f"world: the program gathers over {world} ranks, the threads are {self.world_size}")
        self._parts[_thread.rank] = x
        self._barrier.wait()
        out = torch.cat(list(self._parts), dim=-1)
        self._barrier.wait()
        return out

    def run(self, fn: Callable[[int], object]) -> Sequence:
        """fn(rank) for every rank, each in its own thread (one rank runs in the caller's), in the caller's
        context variables (e.g. the compile's autotune decisions); the results in rank order."""
        results: list = [None] * self.world_size
        errors: list[BaseException] = []

        def rank_main(rank: int) -> None:
            previous = getattr(_thread, "ranks", None), getattr(_thread, "rank", None)
            _thread.ranks, _thread.rank = self, rank
            try:
                results[rank] = fn(rank)
            except BaseException as err:  # noqa: BLE001 - handed to the caller below
                errors.append(err)
                self._barrier.abort()
            finally:
                _thread.ranks, _thread.rank = previous

        if self.world_size == 1:
            rank_main(0)
        else:
            context = contextvars.copy_context()
            threads = [
                threading.Thread(target=context.copy().run, args=(rank_main, r), name=f"kernl-rank{r}")
                for r in range(self.world_size)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errors:
            # The first rank's own error, not the broken barrier it left the others with.
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return results
