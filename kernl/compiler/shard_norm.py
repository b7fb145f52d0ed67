"""After sharding: a row-parallel output's all-reduce that only feeds the next residual add + RMS norm becomes one
kernl.all_reduce_add_rms_norm, which on GPUs of one host sums, adds and normalises in a single kernel
(kernels/peer_norm.py) and elsewhere runs the two ops it replaces. Where that output is a plain linear's
(no bias, activation or residual), the linear joins too: kernl.linear_all_reduce_add_rms_norm, whose GEMV
stores its outputs straight into the ranks' places (kernels/peer_linear_norm.py)."""

from __future__ import annotations

import torch
import torch.fx

from kernl.kernels import register_ops

register_ops()  # the pass writes torch.ops.kernl.all_reduce_add_rms_norm into the graph

kernl_ops = torch.ops.kernl


def fuse_sums_into_norms(graph: torch.fx.Graph) -> int:
    """Rewrite every all_reduce whose one user is an add_rms_norm; returns how many."""
    fused = 0
    for total in list(graph.nodes):
        if total.target is not kernl_ops.all_reduce.default or len(total.users) != 1:
            continue
        norm = next(iter(total.users))
        if norm.target is not kernl_ops.add_rms_norm.default or norm.kwargs:
            continue
        x, residual, *rest = norm.args
        if (x is total) == (residual is total):
            continue  # the sum is both operands, or neither (it reaches the norm some other way)
        other = residual if x is total else x
        with graph.inserting_before(norm):
            fused_node = graph.call_function(kernl_ops.all_reduce_add_rms_norm.default, (total.args[0], other, *rest))
        fused_node.meta.update(norm.meta)
        norm.replace_all_uses_with(fused_node)
        graph.erase_node(norm)
        graph.erase_node(total)
        fused += 1
    return fused


def fuse_linears_into_sums(graph: torch.fx.Graph) -> int:
    """Rewrite every all_reduce_add_rms_norm of a plain kernl.linear's output that nothing else reads; returns
    how many."""
    fused = 0
    for norm in list(graph.nodes):
        if norm.target is not kernl_ops.all_reduce_add_rms_norm.default or norm.kwargs:
            continue
        row = norm.args[0]
        if not isinstance(row, torch.fx.Node) or row.target is not kernl_ops.linear.default or len(row.users) != 1:
            continue
        if row.kwargs or len(row.args) != 6 or any(a is not None for a in row.args[2:5]):
            continue  # a bias, an activation or a residual: the GEMV that pushes has none of them
        x, weight, *_, transposed = row.args
        with graph.inserting_before(norm):
            fused_node = graph.call_function(
                kernl_ops.linear_all_reduce_add_rms_norm.default, (x, weight, transposed, *norm.args[1:])
            )
        fused_node.meta.update(norm.meta)
        norm.replace_all_uses_with(fused_node)
        graph.erase_node(norm)
        graph.erase_node(row)
        fused += 1
    return fused
