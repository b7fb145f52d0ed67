"""Warm-up and check of a tensor-parallel program where it is compiled: its ranks as threads of one process.

Every rank runs the same program on tensors of the same shapes, so rank 0 alone (its sums left out) makes
Triton compile and tune every kernel the bundle ships. Then all ranks run, each on its own weights, with
kernl.all_reduce summing over the threads: rank 0's outputs are checked against the eager model, as for
any bundle, and every rank's against rank 0's.
Threads stand for processes only here: a loaded bundle's ranks are processes (torchrun), one GPU each.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext

import torch

from kernl.compiler.shard import ShardPlan
from kernl.compiler.warmup import _flat, compare
from kernl.kernels.collectives import ThreadRanks


def warm_up_sharded(
    forward: Callable,
    plan: ShardPlan,
    weights: Mapping[str, torch.Tensor],
    weight_names: Sequence[str],
    model: torch.nn.Module,
    make_inputs: Callable[[int, int], dict[str, torch.Tensor]],
    buckets: Sequence[tuple[int, int]],
    device: torch.device,
    input_names: Sequence[str],
    on_bucket: Callable[[tuple[int, int]], None] | None = None,
) -> list[dict]:
    """Each bucket: compile with rank 0, then run every rank and compare (see the module's docstring).

    weights: the unsharded weights by name (on device); each rank's are made with plan. Holds every rank's
    weights on device at once: one more copy of the split weights than the model's.
    """
    ranks = [[plan.shard(name, weights[name], r) for name in weight_names] for r in range(plan.world_size)]
    checks = []

    def run(rank: int, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad(), torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            return list(forward(device, *ranks[rank], *(inputs[n] for n in input_names)))

    for batch, seq in buckets:
        if on_bucket is not None:
            on_bucket((batch, seq))
        inputs = make_inputs(batch, seq)
        # Kernels compile and tune, for every rank.
        ThreadRanks(1, stands_for=plan.world_size).run(functools.partial(run, inputs=inputs))
        with _no_interpreter():
            outs = ThreadRanks(plan.world_size).run(functools.partial(run, inputs=inputs))
        with torch.no_grad():
            want = _flat(model(**inputs))
        # The ranks sum the same values in the same order: only kernels that are not deterministic (atomics)
        # can make them differ; the manifest says by how much.
        spread = max(compare(out, outs[0])["max_abs_diff"] for out in outs)
        checks.append({"bucket": [batch, seq], **compare(outs[0], want), "ranks_max_abs_diff": spread})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return checks


def warm_up_unchecked(
    forward: Callable,
    plan: ShardPlan | None,
    weights: Mapping[str, torch.Tensor],
    weight_names: Sequence[str],
    make_inputs: Callable[[int, int], dict[str, torch.Tensor]],
    buckets: Sequence[tuple[int, int]],
    device: torch.device,
    input_names: Sequence[str],
    on_bucket: Callable[[tuple[int, int]], None] | None = None,
) -> list[dict]:
    """Each bucket run once by rank 0 alone, on its own weights, so Triton compiles and tunes the kernels; nothing
    is compared (a model on the meta device has no eager outputs: kernl.compiler.meta), and each check says so."""
    mine = [(w if plan is None else plan.shard(n, w, 0)).to(device) for n, w in ((n, weights[n]) for n in weight_names)]
    checks = []
    for batch, seq in buckets:
        if on_bucket is not None:
            on_bucket((batch, seq))
        inputs = make_inputs(batch, seq)
        with torch.no_grad(), torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            args = [*mine, *(inputs[n] for n in input_names)]
            alone = ThreadRanks(1, stands_for=plan.world_size if plan is not None else 1)
            alone.run(lambda rank, args=args: forward(device, *args))
        checks.append({"bucket": [batch, seq], "eager": "skipped: the model is on the meta device"})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return checks


@contextlib.contextmanager
def _no_interpreter() -> Iterator[None]:
    """Triton's interpreter (CPU, in tests) patches module globals while it runs a kernel, so threads cannot share
    it: the ranks' threads run the kernels' torch references instead (rank 0 alone ran the interpreted ones)."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
