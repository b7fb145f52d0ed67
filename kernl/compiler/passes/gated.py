"""act(x @ Wg.T) * (x @ Wu.T) (HF's LlamaMLP / GemmaMLP first half: SwiGLU, GeGLU) → kernl.gated_linear.

Runs before the projection fusion, which would otherwise merge gate and up into one wider linear.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx

from kernl.compiler.passes._activation import match_activation
from kernl.compiler.passes._fx import (
    FLOAT_DTYPES,
    arg,
    erase_unused,
    fake,
    is_call,
    only_user,
    other_operand,
    same_shape,
)
from kernl.compiler.passes.context import PassContext

aten = torch.ops.aten


def _bias_free_linear(node) -> bool:
    """A plain x @ W.T (no bias), in a float dtype the kernel takes, weight in x's dtype."""
    if not is_call(node, aten.linear.default) or arg(node, 2, "bias") is not None:
        return False
    x, w = fake(node.args[0]), fake(node.args[1])
    return x is not None and w is not None and w.dim() == 2 and x.dtype in FLOAT_DTYPES and w.dtype == x.dtype


def _gated_args(gate: torch.fx.Node) -> tuple[torch.fx.Node, tuple] | None:
    """(the product node, gated_linear's args) when gate is the gate projection of a gated MLP, else None."""
    if not _bias_free_linear(gate):
        return None
    found = match_activation(gate)
    if found is None:
        return None
    activation, act = found
    product = only_user(act)
    if not is_call(product, aten.mul.Tensor) or list(product.args[:2]).count(act) != 1:
        return None
    up = other_operand(product, act)
    if not _bias_free_linear(up) or up.args[0] is not gate.args[0] or only_user(up) is not product:
        return None
    wg, wu, out, pv = fake(gate.args[1]), fake(up.args[1]), fake(gate), fake(product)
    if not same_shape(wg, wu) or pv is None or not same_shape(pv, out) or pv.dtype != out.dtype:
        return None
    return product, (gate.args[0], gate.args[1], up.args[1], activation)


def fuse_gated_linear(ctx: PassContext) -> Counter:
    graph = ctx.graph
    report: Counter[str] = Counter()
    for node in list(graph.nodes):
        found = _gated_args(node)
        if found is None:
            continue
        product, args = found
        with graph.inserting_before(product):
            fused = graph.call_function(torch.ops.kernl.gated_linear.default, args)
        fused.meta.update(product.meta)  # the product's module: the MLP
        product.replace_all_uses_with(fused)
        erase_unused(product)
        report["gated_linear"] += 1
    return report
