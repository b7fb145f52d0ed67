"""Write rewritten FX graphs as program data: JSON that names each op and its arguments, and holds no code.

The runtime (kernl.runtime.interpret) checks every op against its allow-list and runs the data itself; see
kernl.runtime.program for the format.
"""

from __future__ import annotations

import math

import torch
import torch.fx

from kernl.compiler import hoist
from kernl.errors import KernlError
from kernl.runtime.ops import HOST_OPS, INVARIANTS_TARGET
from kernl.runtime.program import FORWARD, ProgramSpec

_HOST_NAMES = {fn: name for name, fn in HOST_OPS.items()}


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    if target is hoist.invariants:
        return INVARIANTS_TARGET
    if target in _HOST_NAMES:
        return _HOST_NAMES[target]
    if isinstance(target, torch._ops.OpOverload):
        namespace = target.namespace
        packet, overload = target._schema.name.split("::")[-1], target._overloadname
        if namespace == "kernl":
            return f"kernl.{packet}"
        if namespace == "aten":
            return f"aten.{packet}.{overload}"
    raise KernlError(f"{node.name}: the program calls {target!r}, which a bundle cannot hold")


def encode_value(value, where: str):
    """A graph argument as JSON: node references as {"ref": name}, torch enums and non-finite floats tagged."""
    if isinstance(value, torch.fx.Node):
        return {"ref": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": str(value)}
    if isinstance(value, (list, tuple)):
        return [encode_value(v, where) for v in value]
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    raise KernlError(f"{where}: argument {value!r} ({type(value).__name__}) cannot be written as program data")


def function_data(gm: torch.fx.GraphModule) -> dict:
    """One graph as {"params": [...], "nodes": [[name, target, args, kwargs], ...], "output": value}."""
    params, nodes, output = [], [], None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            params.append(node.name)
        elif node.op == "call_function":
            args = encode_value(list(node.args), node.name)
            kwargs = {k: encode_value(v, node.name) for k, v in node.kwargs.items()}
            nodes.append([node.name, _target_name(node), args, kwargs])
        elif node.op == "output":
            output = encode_value(node.args[0], "output")
        else:
            raise KernlError(f"{node.name}: {node.op} nodes (submodules, attributes) cannot be program data")
    return {"params": params, "nodes": nodes, "output": output}


def program_spec(
    gm: torch.fx.GraphModule,
    *,
    invariants: torch.fx.GraphModule | None,
    split: tuple[torch.fx.GraphModule, torch.fx.GraphModule] | None,
    weights: list[str],
    inputs: list[dict],
    outputs: list[dict],
) -> ProgramSpec:
    """The rewritten program as data: its forward entry (head and tail when split), and invariants if hoisted."""
    functions = {}
    if invariants is not None:
        functions["invariants"] = function_data(invariants)
    if split is None:
        functions["forward"] = function_data(gm)
        entry = {"head": "forward", "tail": None}
    else:
        functions["forward.head"], functions["forward.tail"] = function_data(split[0]), function_data(split[1])
        entry = {"head": "forward.head", "tail": "forward.tail"}
    return ProgramSpec(weights, inputs, outputs, functions, {FORWARD: entry})


def generation_spec(
    entries: dict[str, tuple[torch.fx.GraphModule, list[dict]]],
    *,
    weights: list[str],
    state: list[dict],
    outputs: list[dict],
) -> ProgramSpec:
    """A generation program as data: each entry (prefill, decode) one function over (device, weights, state,
    its own inputs), with no tail (its logits stay in graph memory for the sampler)."""
    functions = {name: function_data(gm) for name, (gm, _) in entries.items()}
    table = {
        name: {"head": name, "tail": None, "inputs": inputs, "state": True} for name, (_, inputs) in entries.items()
    }
    return ProgramSpec(weights, [], outputs, functions, table, state)
