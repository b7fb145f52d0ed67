"""Split off the program's last kernels, so that a bundle's outputs come out as fresh tensors with no copy.

A bundle replays its CUDA graph into static memory, and an output left there would be overwritten by the
next call: it has to be copied out. For GPT-2 at 32x256 the logits are 823 MB, and that copy costs 0.5 ms.
Instead, the kernels that write the outputs (the LM head, a final norm, a pooler) move to `tail()`, which
the runtime runs right after each replay, outside the graph: they allocate their outputs like any eager
call. `head()` is everything else, and the graph captures only it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

aten = torch.ops.aten

# Views reshape a tensor without a kernel: an output that is a view is written by the kernel under it.
_VIEWS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor, aten.select.int,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.expand.default, aten.transpose.int,
    aten.permute.default, aten.t.default, aten.alias.default,
}  # fmt: skip
# More kernels than this after the last graph-captured one would cost launch gaps on every call.
MAX_TAIL_KERNELS = 4


def _writer(node: torch.fx.Node) -> torch.fx.Node | None:
    """The kernel that writes the memory an output node reads (None for a placeholder, non-kernel op)."""
    while node.op == "call_function" and node.target in _VIEWS and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    if node.op == "call_function" and node.target is operator.getitem:
        node = node.args[0]  # one result of a kernel returning several (a norm's output and its residual sum)
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    val = node.meta.get("val")
    tensors = isinstance(val, torch.Tensor) or (
        isinstance(val, (tuple, list)) and val and all(isinstance(v, torch.Tensor) for v in val)
    )
    return node if tensors and not node.target._schema.is_mutable else None


def _descendants(seeds: list[torch.fx.Node]) -> set[torch.fx.Node]:
    found: set[torch.fx.Node] = set()
    stack = list(seeds)
    while stack:
        node = stack.pop()
        if node in found or node.op == "output":
            continue
        found.add(node)
        stack.extend(node.users)
    return found


def split_tail(gm: torch.fx.GraphModule, constant_inputs: set[str]) -> tuple[torch.fx.GraphModule, ...] | None:
    """(head, tail) graph modules, or None when no output is written by a kernel or the tail would be long.

    head(<gm's placeholders>) returns the values the tail reads; tail(<gm's constant placeholders>,
    <those values>) returns gm's outputs. constant_inputs: placeholder names fixed for the program's life
    (weights, target_device); the tail takes them directly, in gm's order.
    """
    graph = gm.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    returned = output.args[0]
    seeds = [w for w in (_writer(n) for n in returned if isinstance(n, torch.fx.Node)) if w is not None]
    if not seeds:
        return None
    tail_nodes = _descendants(seeds)
    kernels = [n for n in tail_nodes if n.target not in _VIEWS and n.target is not operator.getitem]
    if len(kernels) > MAX_TAIL_KERNELS:
        return None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    constants = [p for p in placeholders if p.name in constant_inputs]
    # What the tail reads from the head: values it computes, inputs it was given, and outputs the head writes.
    carried: list[torch.fx.Node] = []
    for node in graph.nodes:
        if node in tail_nodes or node in constants:
            continue
        if any(u in tail_nodes for u in node.users) or node in returned:
            carried.append(node)

    head = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.nodes:
        if node.op == "output":
            head.output(tuple(env[n] for n in carried))
        elif node not in tail_nodes:
            env[node] = head.node_copy(node, lambda a: env[a])

    tail = torch.fx.Graph()
    env = {}
    for node in constants + carried:
        env[node] = tail.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in graph.nodes:
        if node in tail_nodes:
            env[node] = tail.node_copy(node, lambda a: env[a])
    tail.output(tuple(env[n] if isinstance(n, torch.fx.Node) else n for n in returned))
    head.lint()
    tail.lint()
    return torch.fx.GraphModule(gm, head), torch.fx.GraphModule(gm, tail)
