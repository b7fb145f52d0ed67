"""Lower a model into the program every rank of a tensor-parallel group runs, and its weights' sharding plan."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from unittest import mock

import torch

from kernl.compiler import lower
from kernl.compiler.lower import Lowered, lower_model
from kernl.compiler.passes import run_passes
from kernl.compiler.shard import ShardPlan, shard_program


def lower_sharded(
    model: torch.nn.Module, buckets: Sequence[tuple[int, int]], world_size: int, **kwargs
) -> tuple[Lowered, Lowered, ShardPlan]:
    """(the unsharded program, the sharded one, its weights' plan) from one export, on CPU.

    The graph is sharded right after the rewrite passes, where kernl.compile shards it. Both Lowered hold the
    unsharded weights; plan.weights_for(sharded.weights, rank) gives a rank's.
    """
    real_export, traced = lower.export_model, []
    plans: list[ShardPlan] = []

    def export_once(*args):
        if not traced:
            traced.append(real_export(*args))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's pytree, deep-copied
            return copy.deepcopy(traced[0])  # each lowering rewrites its graph in place

    def passes_then_shard(gm: torch.fx.GraphModule, weights: dict) -> dict[str, int]:
        report = run_passes(gm, weights)
        plans.append(shard_program(gm, weights, world_size))
        return {**report, **plans[-1].report}

    with mock.patch.object(lower, "export_model", export_once):
        whole = lower_model(model, buckets, device="cpu", **kwargs)
        with mock.patch.object(lower, "run_passes", passes_then_shard):
            sharded = lower_model(model, buckets, device="cpu", **kwargs)
    return whole, sharded, plans[0]
