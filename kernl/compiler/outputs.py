"""Names of the model's outputs and which of their dims follow the batch and sequence."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from kernl.errors import KernlError


def output_names(eager_output, count: int) -> list[str]:
    """Field names as the model returns them (ModelOutput keys), else output_0, output_1, …"""
    if isinstance(eager_output, Mapping):
        names = [k for k, v in eager_output.items() if isinstance(v, torch.Tensor)]
        if len(names) == count:
            return names
    if isinstance(eager_output, torch.Tensor) and count == 1:
        return ["output"]
    return [f"output_{i}" for i in range(count)]


def _dim_roles(ep: ExportedProgram, example: dict[str, torch.Tensor]) -> dict[str, str]:
    """Symbolic size -> 'batch' / 'seq', read off the user inputs' fake shapes."""
    roles = {}
    user = {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user and node.name in example:
            shape = node.meta["val"].shape
            for dim, role in zip(shape, ("batch", "seq")):
                if not str(dim).isdigit():  # a fixed size (a fixed-shape input's mel bins) is no role
                    roles[str(dim)] = role
    return roles


def output_layout(ep: ExportedProgram, example: dict[str, torch.Tensor], *, static: bool) -> list[list]:
    """For each user output, its dims as 'batch', 'seq' or a fixed int, so the runtime can slice padding."""
    specs = ep.graph_signature.output_specs
    if any(s.kind != OutputKind.USER_OUTPUT for s in specs):
        raise KernlError("the model mutates buffers or inputs in its forward; kernl handles pure forwards only")
    roles = _dim_roles(ep, example)
    output_node = next(n for n in ep.graph.nodes if n.op == "output")
    layout = []
    for value in output_node.args[0]:
        val = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor):
            raise KernlError("the model returns a non-tensor output; kernl handles tensor outputs only")
        dims = [roles.get(str(d), int(d) if str(d).isdigit() else str(d)) for d in val.shape]
        if static:  # sizes are plain ints: the leading dims that match the example's are batch and seq
            batch, seq = next(iter(example.values())).shape
            dims = [r if (i, r) not in ((0, batch), (1, seq)) else ("batch", "seq")[i] for i, r in enumerate(dims)]
        layout.append(dims)
    return layout
