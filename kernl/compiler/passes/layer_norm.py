"""aten.layer_norm → kernl.layer_norm; an add feeding it → kernl.add_layer_norm, which returns the sum too."""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx

from kernl.compiler.passes._fx import FLOAT_DTYPES, arg, fake, fuse_add_into_norm, position, replace_with_call
from kernl.compiler.passes.context import PassContext
from kernl.kernels.layer_norm import MAX_HIDDEN

aten = torch.ops.aten


def _fusable_add(node: torch.fx.Node, out: torch.Tensor) -> bool:
    """A plain elementwise add of two same-shape, same-dtype tensors (no broadcast, no alpha)."""
    if not isinstance(node, torch.fx.Node) or node.target is not aten.add.Tensor or node.kwargs.get("alpha", 1) != 1:
        return False
    a, b = (fake(x) for x in node.args[:2])
    return a is not None and b is not None and a.shape == b.shape == out.shape and a.dtype == b.dtype == out.dtype


def _computed_before(graph: torch.fx.Graph, args, anchor: torch.fx.Node) -> bool:
    """Every node in args comes before anchor, so a call placed right after anchor may read it."""
    order = position(graph)
    return all(not isinstance(a, torch.fx.Node) or order[a] < order[anchor] for a in args)


def fuse_layer_norm(ctx: PassContext) -> Counter:
    graph = ctx.graph
    report: Counter[str] = Counter()
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.layer_norm.default:
            continue
        x, shape = node.args[0], arg(node, 1, "normalized_shape")
        weight, bias, eps = arg(node, 2, "weight"), arg(node, 3, "bias"), arg(node, 4, "eps", 1e-5)
        xv = fake(x)
        # The kernel normalises over the last dim only, in a float dtype, up to its register budget.
        if xv is None or len(shape) != 1 or xv.dtype not in FLOAT_DTYPES:
            continue
        hidden = xv.shape[-1]
        if not isinstance(hidden, int) or not 1 <= hidden <= MAX_HIDDEN:
            continue
        if _fusable_add(x, xv) and _computed_before(graph, (weight, bias), x):
            fuse_add_into_norm(graph, x, node, torch.ops.kernl.add_layer_norm.default, (weight, bias, eps))
            graph.erase_node(node)
            graph.erase_node(x)
            report["add_layer_norm"] += 1
        else:
            new = replace_with_call(graph, node, torch.ops.kernl.layer_norm.default, (x, weight, bias, eps))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            report["layer_norm"] += 1
    return report
