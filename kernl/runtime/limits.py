"""Which inputs index a table, and its size: token ids the embedding's rows, type ids their table's rows.

A call whose ids fall outside the table must be refused before it runs: on CUDA, the out-of-bounds read inside
a graph replay is a device-side assert that breaks the CUDA context of the whole process. A manifest input spec
may declare its "limit" (values lie in [0, limit)); for bundles that do not, the limit is found in the program:
an aten.embedding (or index_select on dim 0) whose table is a weight and whose indices are an entry's input,
directly or through ops that only move values (views, copies, slices).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kernl.errors import BundleError

# Ops whose output holds only values of their first argument: ids passed through them keep their range.
_SAME_VALUES = frozenset(
    f"aten.{op}"
    for op in (
        "view.default",
        "reshape.default",
        "_unsafe_view.default",
        "clone.default",
        "contiguous.default",
        "alias.default",
        "detach.default",
        "flatten.using_ints",
        "unsqueeze.default",
        "squeeze.dim",
        "squeeze.dims",
        "squeeze.default",
        "expand.default",
        "permute.default",
        "t.default",
        "transpose.int",
        "slice.Tensor",
        "select.int",
        "lift_fresh_copy.default",
    )
)
_EMBEDDING = "aten.embedding.default"
_INDEX_SELECT = "aten.index_select.default"


def table_limits(
    functions: Mapping[str, Any],
    head: Any,
    weights: Sequence[str],
    inputs: Sequence[str],
    shapes: Mapping[str, Sequence[int]],
) -> dict[str, int]:
    """{input name: rows of the table it indexes} for the inputs of one entry whose head function (program data)
    reads them as indices into a weight; BundleError when such a table is not 2-D. shapes: each weight's shape.
    The head's parameters are (device, *weights, ..., *inputs): weights right after the device, inputs last."""
    fn = functions.get(head) if isinstance(head, str) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("params"), list) or not isinstance(fn.get("nodes"), list):
        return {}
    params = fn["params"]
    if len(params) < 1 + len(weights) + len(inputs):
        return {}
    role: dict[str, tuple[str, str]] = {}  # slot name -> ("weight" | "input", its program name)
    for i, name in enumerate(weights):
        role[params[1 + i]] = ("weight", name)
    for i, name in enumerate(inputs):
        role[params[len(params) - len(inputs) + i]] = ("input", name)
    limits: dict[str, int] = {}
    for node in fn["nodes"]:
        if not (isinstance(node, list) and len(node) == 4 and isinstance(node[2], list)):
            continue
        out, target, args, _ = node
        if not isinstance(out, str):
            continue
        if target in _SAME_VALUES and args and role.get(_ref(args[0]), ("",))[0] == "input":
            role[out] = role[_ref(args[0])]  # the same ids, moved
            continue
        if target == _EMBEDDING and len(args) >= 2:
            table, index = _ref(args[0]), _ref(args[1])
        elif target == _INDEX_SELECT and len(args) == 3 and args[1] == 0:
            table, index = _ref(args[0]), _ref(args[2])
        else:
            continue
        if role.get(table, ("",))[0] != "weight" or role.get(index, ("",))[0] != "input":
            continue
        weight = role[table][1]
        shape = shapes.get(weight)
        if shape is None:
            continue
        if len(shape) != 2:
            raise BundleError(f"program: {head}/{out} indexes {weight!r} as a table, but it has shape {list(shape)}")
        size, name = shape[0], role[index][1]
        limits[name] = min(size, limits.get(name, size))
    return limits


def with_limits(specs: Sequence[dict[str, Any]], found: Mapping[str, int], where: str) -> list[dict[str, Any]]:
    """Copies of input specs carrying each one's "limit": the declared one, which must not exceed the table the
    program indexes with it, else the one found."""
    out = []
    for spec in specs:
        declared, table = spec.get("limit"), found.get(spec["name"])
        if declared is not None and (type(declared) is not int or declared < 1):
            raise BundleError(f"{where}: input {spec['name']!r}: limit {declared!r} is not a positive integer")
        if declared is not None and table is not None and declared > table:
            raise BundleError(
                f"{where}: input {spec['name']!r} declares values below {declared}, but the table it indexes has "
                f"{table} rows"
            )
        limit = declared if declared is not None else table
        out.append({**spec, "limit": limit} if limit is not None else dict(spec))
    return out


def _ref(value: Any) -> str | None:
    ref = value.get("ref") if isinstance(value, dict) and len(value) == 1 else None
    return ref if isinstance(ref, str) else None
