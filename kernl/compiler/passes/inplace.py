"""In-place aten ops on a temporary → their functional overload, so that the program stays functional.

Export keeps `x += y` on a value the model computed itself as aten.add_ (T5's relative position buckets:
`relative_buckets += torch.where(...)`). The runtime's allow-list refuses every mutating op; when nothing
else reads the mutated tensor, add_(a, b) and add(a, b) give the same value and the graph loses nothing.
A mutation of an input, of a weight or of a view (which would write through to its base) stays as it was.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx

from kernl.compiler.passes.context import PassContext

aten = torch.ops.aten


def _functional(target) -> torch._ops.OpOverload | None:
    """aten.<op>.<overload> for aten.<op>_.<overload> when that overload exists, else None."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    name = target._schema.name.split("::")[-1]
    if not name.endswith("_") or name.startswith("_") or not target._schema.is_mutable:
        return None
    packet = getattr(aten, name[:-1], None)
    overload = getattr(packet, target._overloadname, None) if packet is not None else None
    if not isinstance(overload, torch._ops.OpOverload) or overload._schema.is_mutable:
        return None
    return overload


def _owns_its_memory(node) -> bool:
    """A temporary nothing aliases: computed by an op that returns a fresh tensor (not a view or an input)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    returns = target._schema.returns
    return len(returns) == 1 and returns[0].alias_info is None and not target._schema.is_mutable


def functionalize_inplace(ctx: PassContext) -> Counter:
    graph = ctx.graph
    report: Counter[str] = Counter()
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.args:
            continue
        functional = _functional(node.target)
        mutated = node.args[0]
        # The mutated tensor must be read by this op only: any other reader would see the value before or after.
        if functional is None or not _owns_its_memory(mutated) or set(mutated.users) != {node}:
            continue
        node.target = functional
        report["inplace_functionalized"] += 1
    return report
