"""Tensor-parallel sharding of the rewritten graph: Q/K/V and gate/up split by columns, out and down projections
by rows with one all-reduce each, heads split across ranks; the ranks' outputs sum back to the whole program's.

The ranks here are threads whose all-reduce sums over the threads (tests/runtime/test_tensor_parallel.py runs
real processes over gloo): each rank runs the same sharded graph on its own weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx

from kernl.compiler.shard import Scaled, Split, shard_program
from kernl.errors import KernlError
from kernl.kernels.collectives import ThreadRanks, all_reduce, all_reduce_reference
from tests.models import token_inputs

kernl_ops = torch.ops.kernl


def _run_ranks(gm: torch.fx.GraphModule, rank_weights: list[dict], inputs: dict) -> list[tuple]:
    """Each rank's outputs: the ranks are threads, and kernl.all_reduce sums over them."""

    def run(rank: int) -> tuple:
        args = [
            rank_weights[rank][n.name] if n.name in rank_weights[rank] else inputs[n.name]
            for n in gm.graph.nodes
            if n.op == "placeholder"
        ]
        with torch.no_grad():
            return tuple(gm(*args))

    return ThreadRanks(len(rank_weights), timeout_s=60).run(run)


def _shard(family, world_size: int):
    gm = copy.deepcopy(family.program.gm)  # the session's rewritten program stays whole for other tests
    return gm, shard_program(gm, family.program.weights, world_size)


def _calls(gm: torch.fx.GraphModule, target) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


@pytest.fixture
def references(monkeypatch):
    """The kernels' torch references: Triton's interpreter patches globals, and the ranks run in threads."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_ranks_sum_to_the_whole_program(families, name, references):
    family = families(name)
    layers = family.model.config.num_hidden_layers
    gm, plan = _shard(family, 2)
    # Every layer: attention split by heads, its out projection and the MLP's down projection summed once.
    assert plan.report["tp_attention"] == layers
    assert plan.report["tp_all_reduce"] == plan.report["tp_row_parallel"] == 2 * layers
    # An RMS-norm decoder's sums each feed the next residual add + norm, and become one op with it.
    assert plan.report["tp_all_reduce_in_norm"] == (2 * layers if name == "llama" else 0)
    # ... and each takes in the plain linear before it, whose GEMV then writes straight to the ranks.
    assert plan.report["tp_linear_in_norm"] == plan.report["tp_all_reduce_in_norm"]
    fused = _calls(gm, kernl_ops.linear_all_reduce_add_rms_norm.default)
    sums = _calls(gm, kernl_ops.all_reduce.default) + _calls(gm, kernl_ops.all_reduce_add_rms_norm.default)
    assert len(sums) + len(fused) == 2 * layers
    for total in sums:
        row = total.args[0]
        assert row.target is kernl_ops.linear.default and list(row.users) == [total]
        assert row.args[3] is None and row.args[4] is None  # activation and residual need the whole sum
    for op in fused:
        assert op.args[1].op == "placeholder" and plan.rules[op.args[1].name].dim == 1  # row-parallel: split by in

    assert not any("pooler" in w or "embed" in w for w in plan.rules)  # BERT's pooler reaches the output: whole
    inputs = token_inputs(2, 7)  # another shape than the export's: the per-rank program stays dynamic
    want = family.program(**inputs)
    outs = _run_ranks(gm, [plan.weights_for(family.program.weights, r) for r in range(2)], inputs)
    for got in outs:
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            assert (g - w).abs().max() < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_each_rank_holds_one_part_of_each_split_weight(families, name):
    family = families(name)
    world = 2
    _, plan = _shard(family, world)
    weights = family.program.weights
    ranks = [plan.weights_for(weights, r) for r in range(world)]
    split = {n: r for n, r in plan.rules.items() if isinstance(r, Split)}
    assert split
    for weight_name, rule in split.items():
        full = weights[weight_name]
        parts = [ranks[r][weight_name] for r in range(world)]
        assert all(p.numel() * world == full.numel() and p.is_contiguous() for p in parts)
        # Each block (Q, K, V of a fused projection) is cut in world equal parts, rank r holding the r-th.
        start = local = 0
        for size in rule.segments:
            chunk = size // world
            pieces = [p.narrow(rule.dim, local, chunk) for p in parts]
            assert torch.equal(torch.cat(pieces, rule.dim), full.narrow(rule.dim, start, size))
            start, local = start + size, local + chunk
    for weight_name, rule in plan.rules.items():
        if isinstance(rule, Scaled):  # a row-parallel bias: the sum adds it once
            assert torch.allclose(sum(ranks[r][weight_name] for r in range(world)), weights[weight_name])
    for weight_name in weights.keys() - plan.rules.keys():  # embeddings, norms: the same tensor on every rank
        assert all(ranks[r][weight_name] is weights[weight_name] for r in range(world))
    # What is split is Megatron's: the attention and MLP projections, never the embeddings.
    split_linears = [n for n in _calls(family.program.gm, kernl_ops.linear.default) if n.args[1].name in split]
    assert len(split_linears) + len(_calls(family.program.gm, kernl_ops.gated_linear.default)) == 4 * (
        family.model.config.num_hidden_layers
    )
    assert not any("embed" in n or "wte" in n or "wpe" in n for n in split)


@pytest.mark.parametrize(
    ("name", "world_size", "message"),
    [
        ("llama", 4, "4 query heads and 2 key/value heads do not split evenly over 4 ranks"),
        ("llama", 3, "4 query heads do not split evenly over 3 ranks"),
        ("gpt2", 4, "2 query heads do not split evenly over 4 ranks"),
    ],
)
def test_heads_that_do_not_divide_are_refused(families, name, world_size, message):
    family = families(name)
    gm = copy.deepcopy(family.program.gm)
    before = gm.code
    with pytest.raises(KernlError, match=message):
        shard_program(gm, family.program.weights, world_size)
    assert gm.code == before  # refused before anything was rewritten


def test_a_world_of_one_changes_nothing(families):
    family = families("llama")
    gm = copy.deepcopy(family.program.gm)
    plan = shard_program(gm, family.program.weights, 1)
    assert plan.rules == {} and gm.code == family.program.gm.code
    with pytest.raises(KernlError, match="positive int"):
        shard_program(gm, family.program.weights, 0)


def test_all_reduce_without_a_process_group_is_the_tensor():
    x = torch.randn(3, 5)
    assert all_reduce(x) is x
    copy_ = all_reduce_reference(x)
    assert copy_ is not x and torch.equal(copy_, x)
    assert torch.equal(kernl_ops.all_reduce(x), x)


def test_thread_ranks_sum_and_fail_together():
    ranks = ThreadRanks(3, timeout_s=30)
    outs = ranks.run(lambda rank: all_reduce(torch.full((4,), float(rank + 1))))
    assert all(torch.equal(o, torch.full((4,), 6.0)) for o in outs)

    def second_fails(rank: int):
        if rank == 1:
            raise ValueError("rank 1 broke")
        return all_reduce(torch.ones(2))  # the others would wait for rank 1 forever

    with pytest.raises(ValueError, match="rank 1 broke"):
        ThreadRanks(3, timeout_s=30).run(second_fails)
