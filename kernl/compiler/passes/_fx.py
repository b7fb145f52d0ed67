"""Small helpers the passes share for reading and building FX nodes."""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.utils._pytree as pytree

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


# Ops that only change a tensor's shape or strides, never its values.
VIEW_OPS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


def is_call(node, *targets) -> bool:
    """node is a call_function node of one of targets."""
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def same_size(a, b) -> bool:
    """Two dims (ints or SymInts) equal for every shape export allows; False when unknown."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - an undecidable comparison is a mismatch
        return False


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(same_size(x, y) for x, y in zip(a.shape, b.shape))


def only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    """node's single user, or None when it has none or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def scalar_operand(node, target, tensor: torch.fx.Node) -> float | None:
    """The number c when node is target(tensor, c) or target(c, tensor) (a commutative op with a scalar)."""
    if not is_call(node, target) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    if a is tensor and isinstance(b, (int, float)) and not isinstance(b, bool):
        return float(b)
    if b is tensor and isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a)
    return None


def other_operand(node: torch.fx.Node, one) -> object:
    """The other argument of a binary call node that reads `one`."""
    a, b = node.args[:2]
    return b if a is one else a


def position(graph: torch.fx.Graph) -> dict[torch.fx.Node, int]:
    """Each node's index in graph order, to check that a value is computed before a node reads it."""
    return {n: i for i, n in enumerate(graph.nodes)}


def infer_val(node: torch.fx.Node) -> None:
    """Recompute node's fake value from its inputs' (after a rewrite changed its op or arguments)."""
    vals = []
    torch.fx.map_arg((node.args, node.kwargs), lambda n: vals.append(n.meta.get("val")))
    leaves = pytree.tree_leaves(vals)  # a multi-output op's value is a tuple
    fake_mode = next((v.fake_mode for v in leaves if hasattr(v, "fake_mode")), None)
    if fake_mode is None:
        node.meta.pop("val", None)
        return
    args, kwargs = torch.fx.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    with fake_mode:
        if node.target is torch.ops.aten.linear.default:
            # Shape rule by hand: torch 2.11's composite linear calls numel() on symbolic sizes.
            x, w = args[0], args[1]
            node.meta["val"] = x.new_empty((*x.shape[:-1], w.shape[0]))
        else:
            node.meta["val"] = node.target(*args, **kwargs)


def insert_call(graph: torch.fx.Graph, anchor: torch.fx.Node, target, args: tuple, *, after: bool = False):
    """target(*args) inserted just before (or after) anchor, with its fake value inferred."""
    with graph.inserting_after(anchor) if after else graph.inserting_before(anchor):
        new = graph.call_function(target, args)
    if "nn_module_stack" in anchor.meta:
        new.meta["nn_module_stack"] = anchor.meta["nn_module_stack"]
    infer_val(new)
    return new


def erase_unused(node: torch.fx.Node) -> None:
    """Erase node if nothing reads it, then the inputs that leaves unread (what a fused pattern computed)."""
    stack, erased = [node], set()
    while stack:
        n = stack.pop()
        if n in erased or n.op != "call_function" or n.users:
            continue
        inputs = n.all_input_nodes
        n.graph.erase_node(n)
        erased.add(n)
        stack.extend(inputs)


def fuse_add_into_norm(
    graph: torch.fx.Graph, add: torch.fx.Node, norm_out: torch.fx.Node, target, norm_args: tuple
) -> torch.fx.Node:
    """norm(a + b) → target(a, b, *norm_args), which returns (normed, a + b); returns the normed node.

    The call goes right after the add: the add's other users (the residual stream) may read the sum before
    the norm. The old add and norm are left without users.
    """
    fused = insert_call(graph, add, target, (*add.args[:2], *norm_args), after=True)
    fused.meta.update({k: v for k, v in norm_out.meta.items() if k != "val"})
    with graph.inserting_after(fused):
        total = graph.call_function(operator.getitem, (fused, 1))
        normed = graph.call_function(operator.getitem, (fused, 0))
    normed.meta.update(norm_out.meta)
    total.meta.update(add.meta)
    norm_out.replace_all_uses_with(normed)
    add.replace_all_uses_with(total)
    return normed
