"""Small helpers the passes share for reading and building FX nodes."""

from __future__ import annotations

import torch
import torch.fx

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def arg(node: torch.fx.Node, index: int, name: str, default=None):
    """An argument of a call node, whether passed by position or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def fake(value) -> torch.Tensor | None:
    """The fake tensor export recorded for a node, or None for non-nodes and non-tensors."""
    if isinstance(value, torch.fx.Node):
        val = value.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val
    return None


def replace_with_call(graph: torch.fx.Graph, old: torch.fx.Node, target, args: tuple) -> torch.fx.Node:
    """Insert target(*args) before old, carrying its metadata (fake value, module path)."""
    with graph.inserting_before(old):
        new = graph.call_function(target, args)
    new.meta.update(old.meta)
    return new
