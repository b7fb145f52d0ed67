"""Remove ops that do nothing at inference: dropout in eval mode, metadata asserts, identity clones."""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx

from kernl.compiler.passes._fx import arg
from kernl.compiler.passes.context import PassContext

aten = torch.ops.aten


def remove_inference_noops(ctx: PassContext) -> Counter:
    graph = ctx.graph
    report: Counter[str] = Counter()
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.dropout.default and (arg(node, 1, "p") == 0 or not arg(node, 2, "train")):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            report["dropout_removed"] += 1
        elif node.target in (aten._assert_tensor_metadata.default, aten._assert_scalar.default) and not node.users:
            graph.erase_node(node)
            report["assert_removed"] += 1
    return report
