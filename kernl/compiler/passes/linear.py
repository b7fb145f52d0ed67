"""Linear layers → kernl.linear, with the activation and the residual add that follow folded into its epilogue.

Matched: aten.linear (nn.Linear), and GPT-2's Conv1D as exported: addmm(bias, x.view(-1, in), W[in, out])
(or mm / matmul without bias) on a weight input, read in place with weight_transposed=True.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx

from kernl.compiler.passes._activation import match_activation
from kernl.compiler.passes._fx import (
    FLOAT_DTYPES,
    VIEW_OPS,
    arg,
    erase_unused,
    fake,
    insert_call,
    is_call,
    only_user,
    other_operand,
    position,
    same_shape,
    same_size,
)
from kernl.compiler.passes.context import PassContext

aten = torch.ops.aten


def _weight_operand(node, ctx: PassContext) -> tuple[torch.fx.Node, bool] | None:
    """(weight, weight_transposed) for mm's second operand: a 2-D weight input, as is or transposed."""
    transposed = True  # W[in, out] as Conv1D stores it
    swaps = is_call(node, aten.t.default) or (
        is_call(node, aten.transpose.int) and {d % 2 for d in node.args[1:3]} == {0, 1}
    )
    if swaps and fake(node.args[0]) is not None and fake(node.args[0]).dim() == 2:
        node, transposed = node.args[0], False  # x @ W.T of a W[out, in]: a plain linear
    if not isinstance(node, torch.fx.Node) or node.op != "placeholder" or node.name not in ctx.weights:
        return None
    return node, transposed


def _flat_input(mat1: torch.fx.Node, node: torch.fx.Node) -> torch.fx.Node:
    """x when mat1 is x.view(-1, in) and node's users only reshape its output: the kernel takes [..., in]."""
    if is_call(mat1, *VIEW_OPS) and all(is_call(u, *VIEW_OPS) for u in node.users):
        x, flat = fake(mat1.args[0]), fake(mat1)
        if x is not None and flat is not None and x.dim() >= 2 and same_size(x.shape[-1], flat.shape[-1]):
            return mat1.args[0]
    return mat1


def _linear_args(node: torch.fx.Node, ctx: PassContext) -> tuple | None:
    """(x, weight, bias, weight_transposed) of a linear layer kernl.linear can run, else None."""
    if is_call(node, aten.linear.default):
        x, weight, bias, transposed = node.args[0], node.args[1], arg(node, 2, "bias"), False
    elif is_call(node, aten.addmm.default, aten.mm.default, aten.matmul.default):
        if node.target is aten.addmm.default and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
            return None
        bias = node.args[0] if node.target is aten.addmm.default else None
        mat1, mat2 = node.args[-2:]
        found = _weight_operand(mat2, ctx)
        if found is None:
            return None
        weight, transposed = found
        x = _flat_input(mat1, node) if node.target is not aten.matmul.default else mat1
    else:
        return None
    xv, wv, bv = fake(x), fake(weight), fake(bias)
    if (
        xv is None
        or wv is None
        or xv.dtype not in FLOAT_DTYPES
        or xv.dim() < (1 if node.target is aten.linear.default else 2)
    ):
        return None
    if wv.dim() != 2 or wv.dtype != xv.dtype or not same_size(wv.shape[0 if transposed else 1], xv.shape[-1]):
        return None
    if bias is not None and (bv is None or bv.dim() != 1 or bv.dtype != xv.dtype):
        return None  # addmm broadcasts a 2-D bias too; the kernel takes [out]
    return x, weight, bias, transposed


def _through_views(node: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """Follow node's single-user chain of reshapes: (its end, the reshapes). Element-wise ops commute with them."""
    chain = []
    while (user := only_user(node)) is not None and is_call(user, *VIEW_OPS) and user.args[0] is node:
        chain.append(user)
        node = user
    return node, chain


def _fold_activation(linear: torch.fx.Node, report: Counter) -> None:
    end, _ = _through_views(linear)
    found = match_activation(end)
    if found is None:
        return
    name, out = found
    out.replace_all_uses_with(end)
    erase_unused(out)
    linear.update_arg(3, name)
    report["linear_activation"] += 1


def _fold_residual(linear: torch.fx.Node, report: Counter) -> None:
    end, chain = _through_views(linear)
    add = only_user(end)
    if not is_call(add, aten.add.Tensor) or add.kwargs.get("alpha", 1) != 1 or list(add.args[:2]).count(end) != 1:
        return
    other = other_operand(add, end)
    lv, ov, av = fake(linear), fake(other), fake(add)
    # Same shape and dtype on both sides: a broadcasting or promoting add is not a residual.
    if (
        ov is None
        or av is None
        or not (same_shape(ov, lv) and same_shape(av, ov))
        or not ov.dtype == lv.dtype == av.dtype
    ):
        return
    order = position(linear.graph)
    if order[other] > order[linear]:
        # The residual is computed later: move the linear (and its reshapes) down to the add.
        for n in (linear, *chain):
            add.prepend(n)
    linear.update_arg(4, other)
    add.replace_all_uses_with(end)
    linear.graph.erase_node(add)
    report["linear_residual"] += 1


def fuse_linear(ctx: PassContext) -> Counter:
    graph = ctx.graph
    report: Counter[str] = Counter()
    for node in list(graph.nodes):
        args = _linear_args(node, ctx) if node.op == "call_function" else None
        if args is None:
            continue
        x, weight, bias, transposed = args
        linear = insert_call(graph, node, torch.ops.kernl.linear.default, (x, weight, bias, None, None, transposed))
        node.replace_all_uses_with(linear)
        erase_unused(node)
        report["linear"] += 1
        _fold_activation(linear, report)
        _fold_residual(linear, report)
    return report
