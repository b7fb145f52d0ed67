"""A decode step's self-attention call: decode_attention_append, with the layer's rotary folded in where it can be.

When q and k come straight from one kernl.rotary node that nothing else reads (as in HF's Llama), the
step calls kernl.decode_attention_append_rotary on rotary's inputs instead: the attention kernel rotates q and
the new key itself, and the rotary kernel leaves the step (its launch and its dependency wait, several µs a
layer at batch 1). KERNL_DECODE_ROTARY_FOLD=0 when the bundle is built keeps the two kernels (an A/B switch).
"""

from __future__ import annotations

import operator
import os

import torch
import torch.fx

from kernl.compiler.passes._fx import fake, is_call

aten = torch.ops.aten
kernl_ops = torch.ops.kernl


def fold_enabled() -> bool:
    return os.environ.get("KERNL_DECODE_ROTARY_FOLD", "1") != "0"


def _rotary_of(q: torch.fx.Node, k: torch.fx.Node) -> torch.fx.Node | None:
    """The kernl.rotary node whose outputs 0 and 1 are exactly q and k and are read by one node only, else None."""
    if not (is_call(q, operator.getitem) and is_call(k, operator.getitem)):
        return None
    rotary = q.args[0]
    if not is_call(rotary, kernl_ops.rotary.default) or k.args[0] is not rotary or (q.args[1], k.args[1]) != (0, 1):
        return None
    if set(rotary.users) != {q, k} or len(q.users) != 1 or set(q.users) != set(k.users):
        return None
    cos = fake(rotary.args[2])
    if cos is None or cos.dim() not in (2, 3):
        return None
    return rotary


def _rows(graph: torch.fx.Graph, table: torch.fx.Node) -> torch.fx.Node:
    """rotary's cos/sin at one token a row ([1, rot], or [b|1, 1, rot]) as [rows or 1, rot]."""
    if fake(table).dim() == 3:
        return graph.call_function(aten.squeeze.dim, (table, 1))
    return table


def decode_attention_call(
    graph: torch.fx.Graph,
    q: torch.fx.Node,
    k: torch.fx.Node,
    v: torch.fx.Node,
    k_cache: torch.fx.Node,
    v_cache: torch.fx.Node,
    positions: torch.fx.Node,
    scale: float | None,
) -> torch.fx.Node:
    """Insert, at the graph's insertion point, the step's attention over q, k, v [b, heads, 1, d] (the attention
    node's arguments; q and k may be a rotary's outputs), appending k/v at positions; returns its [b, heads_q, d]
    result. The rotary node, if folded, is left without users for dead-code elimination."""
    rotary = _rotary_of(q, k) if fold_enabled() else None
    if rotary is None:
        q3, k3, v3 = (graph.call_function(aten.squeeze.dim, (t, 2)) for t in (q, k, v))
        return graph.call_function(
            kernl_ops.decode_attention_append.default, (q3, k_cache, v_cache, k3, v3, positions, scale)
        )
    q_in, k_in, cos, sin = rotary.args[:4]
    q3, k3, v3 = (graph.call_function(aten.squeeze.dim, (t, 2)) for t in (q_in, k_in, v))
    return graph.call_function(
        kernl_ops.decode_attention_append_rotary.default,
        (q3, k_cache, v_cache, k3, v3, positions, _rows(graph, cos), _rows(graph, sin), scale),
    )
