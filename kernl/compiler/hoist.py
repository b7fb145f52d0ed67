"""Move what depends only on the weights and the input shapes out of forward: computed once per shape.

Position ids, token-type and position embeddings, the index grids of a mask, rotary cos/sin tables: for a
given bucket they are the same on every call, yet each costs a kernel launch. The program computes them in
`invariants()` on the first call of a shape and keeps them (one entry per shape and device, for the
bundle's life); the CUDA graph captured after that warm-up run only reads them.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

aten = torch.ops.aten

# Ops whose value changes from one call to the next even with the same inputs.
_RANDOM = ("rand", "randn", "randint", "randperm", "bernoulli", "normal", "dropout", "native_dropout", "uniform")
_SHAPE_MATH = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.neg)


def _is_pure(node: torch.fx.Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return not target._schema.is_mutable and target._schema.name.split("::")[-1] not in _RANDOM
    return target is operator.getitem


def _is_tensor(node: torch.fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _is_shape(node: torch.fx.Node, shapes: set[torch.fx.Node]) -> bool:
    """A host-side integer computed from input sizes: sym_size, or arithmetic on such values."""
    if node.op != "call_function":
        return False
    if node.target is aten.sym_size.int:
        return node.args[0].op == "placeholder"
    return node.target in _SHAPE_MATH and all(a in shapes for a in node.all_input_nodes)


def _invariant_nodes(graph: torch.fx.Graph, constant_inputs: set[str]) -> tuple[set, set]:
    """(shape values, tensor nodes computed from weights and shapes only), never feeding the output directly."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    returned = set(output.all_input_nodes)
    shapes: set[torch.fx.Node] = set()
    known = {n for n in graph.nodes if n.op == "placeholder" and n.name in constant_inputs}
    computed: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if _is_shape(node, shapes):
            shapes.add(node)
        elif (
            node.op == "call_function"
            and node not in returned
            and _is_pure(node)
            and all(a in known or a in shapes or a in computed for a in node.all_input_nodes)
            and (_is_tensor(node) or _tensor_tuple(node))
        ):
            computed.add(node)
    return shapes, computed


def _tensor_tuple(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in val)


def hoist_invariants(gm: torch.fx.GraphModule, constant_inputs: set[str]) -> torch.fx.GraphModule | None:
    """Split gm: returns the graph of its shape-invariant values (or None when nothing launches a kernel).

    gm then calls `invariants(<constant inputs>, <shape values>)` once, right after its shape values, and
    reads the hoisted tensors from its result. constant_inputs: placeholder names fixed for the program's
    life (weights, buffers, target_device).
    """
    graph = gm.graph
    shapes, computed = _invariant_nodes(graph, constant_inputs)
    frontier = [n for n in graph.nodes if n in computed and any(u not in computed for u in n.users)]
    frontier = [n for n in frontier if _is_tensor(n)]
    views = {aten.view.default, aten.reshape.default, aten.slice.Tensor, aten.expand.default, aten.unsqueeze.default,
             aten.transpose.int, aten.permute.default, aten.select.int, aten.t.default, aten.alias.default}  # fmt: skip
    if not frontier or all(n.target in views or n.target is operator.getitem for n in computed):
        return None
    # Only what the frontier needs moves (a computed node whose value stays needed elsewhere is a frontier).
    needed: set[torch.fx.Node] = set()
    stack = list(frontier)
    while stack:
        node = stack.pop()
        if node in needed or node not in computed:
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    if any(u not in needed for n in needed if n not in frontier for u in n.users):
        return None  # a non-tensor intermediate read outside: keep the graph as it is
    params = [n for n in graph.nodes if n not in needed and any(u in needed for u in n.users)]

    sub = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for p in params:
        env[p] = sub.placeholder(p.name)
        env[p].meta = dict(p.meta)
    for node in graph.nodes:
        if node in needed:
            env[node] = sub.node_copy(node, lambda a: env[a])
    sub.output(tuple(env[n] for n in frontier))

    # Shape values first, so that the call can sit before every consumer of what it returns.
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for node in [n for n in graph.nodes if n in shapes]:
        last.append(node)
        last = node
    with graph.inserting_after(last):
        call = graph.create_node("call_function", invariants, tuple(params), name="hoisted")
    anchor = call
    for i, node in enumerate(frontier):
        with graph.inserting_after(anchor):
            anchor = graph.call_function(operator.getitem, (call, i))
        anchor.meta = dict(node.meta)
        node.replace_all_uses_with(anchor, delete_user_cb=lambda user: user not in needed)
    for node in reversed([n for n in graph.nodes if n in needed]):
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return torch.fx.GraphModule(gm, sub)


def invariants(*args):
    """Stands for program.py's own invariants() in the rewritten graph; never called."""
    raise RuntimeError("invariants() is defined by the generated program")
