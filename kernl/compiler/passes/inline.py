"""Inline the no-grad / autocast-off regions export wraps in higher-order ops, so the program is one flat graph.

HF's rotary embedding runs under @torch.no_grad (and, in some versions, autocast disabled); export keeps
such a region as a `get_attr` submodule called by a higher-order op, which kernl's codegen cannot write.
At inference neither wrapper changes a value: grad mode is irrelevant, and an autocast-*disabled*
region computes exactly as plain code (HF casts explicitly inside it). Enabled autocast would change
dtypes, so that wrapper stays as it is. Whether a region exists at all depends on the transformers version
(5.24's Llama rotary has neither wrapper) and on the caller's autocast (HF's maybe_autocast opens a region
only under an enabled outer autocast, nested in the no-grad one): the pass inlines whatever nesting it finds.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.fx

from kernl.compiler.passes.context import PassContext


def _hop(name: str):
    return getattr(torch.ops.higher_order, name, None)


def _body_and_args(node: torch.fx.Node) -> tuple[torch.fx.Node, tuple] | None:
    """(get_attr node of the body, the body's arguments) for an inlinable wrapper call, else None."""
    if node.op != "call_function" or node.kwargs:
        return None
    set_grad, autocast = _hop("wrap_with_set_grad_enabled"), _hop("wrap_with_autocast")
    if set_grad is not None and node.target is set_grad:
        body, args = node.args[1], node.args[2:]
    elif autocast is not None and node.target is autocast and node.args[2] is False:
        # (device_type, dtype, enabled, cache_enabled, body, *args)
        body, args = node.args[4], node.args[5:]
    else:
        return None
    if not isinstance(body, torch.fx.Node) or body.op != "get_attr":
        return None
    return body, args


def _inline(gm: torch.fx.GraphModule, node: torch.fx.Node, body: torch.fx.Node, args: tuple) -> int:
    """Copy the body's nodes in place of the wrapper call; how many regions that inlined (0: it could not)."""
    graph = gm.graph
    sub = gm.get_submodule(body.target)
    if not isinstance(sub, torch.fx.GraphModule):
        return 0
    inner = _inline_all(sub)  # a region nested in this one (no-grad around autocast-off) goes first
    inputs = [n for n in sub.graph.nodes if n.op == "placeholder"]
    output = next(n for n in reversed(sub.graph.nodes) if n.op == "output")
    returns_tuple = isinstance(output.args[0], (tuple, list))
    if len(inputs) != len(args) or (returns_tuple and any(u.target is not operator.getitem for u in node.users)):
        return inner
    if any(n.op == "get_attr" for n in sub.graph.nodes):
        return inner  # a body still reading attributes (a region it could not inline) is left alone
    with graph.inserting_before(node):
        out = graph.graph_copy(sub.graph, dict(zip(inputs, args)))
    if returns_tuple:
        for user in list(node.users):
            user.replace_all_uses_with(out[user.args[1]])
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(out)
    graph.erase_node(node)
    if not body.users:
        graph.erase_node(body)
    return inner + 1


def _inline_all(gm: torch.fx.GraphModule) -> int:
    """Inline every inlinable region of gm's graph, nested ones included; how many."""
    count = 0
    for node in list(gm.graph.nodes):
        found = _body_and_args(node)
        if found is not None:
            count += _inline(gm, node, *found)
    if count:
        gm.delete_all_unused_submodules()
        gm.recompile()  # a body that stays wrapped must run its new graph
    return count


def inline_higher_order_ops(ctx: PassContext) -> Counter:
    gm = ctx.graph.owning_module
    report: Counter[str] = Counter()
    if gm is not None and (count := _inline_all(gm)):
        report["inlined_region"] = count
    return report
