"""HF's rotate-half rotary embedding of q and k → one kernl.rotary(q, k, cos, sin) call.

Matched per tensor:  x * cos + cat(-x[..., d/2:], x[..., :d/2]) * sin   (cos, sin: [b|1, 1, s, d] or [s, d]),
and the partial form  cat(rotary(x[..., :rot]), x[..., rot:]). Two rotations that share cos and sin
(q's and k's) make one kernel call.
"""

from __future__ import annotations

import operator
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
import torch.fx

from kernl.compiler.passes._fx import (
    FLOAT_DTYPES,
    erase_unused,
    fake,
    insert_call,
    is_call,
    only_user,
    position,
    same_shape,
    same_size,
)
from kernl.compiler.passes.context import PassContext

aten = torch.ops.aten


@dataclass
class _Rotation:
    x: torch.fx.Node  # the kernel's input: [b, h, s, head_dim]
    out: torch.fx.Node  # the node computing the rotated x
    cos: torch.fx.Node  # as broadcast against x: [b|1, 1, s, rot] or [s, rot]
    sin: torch.fx.Node
    rot: int  # how many leading dims of head_dim rotate


def _last_dim_slice(node, x, start: int, stop: int) -> bool:
    """node is x[..., start:stop] (stop = x's last dim size may be written as any larger end)."""
    if not is_call(node, aten.slice.Tensor) or node.args[0] is not x:
        return False
    xv = fake(x)
    given = list(node.args[1:5])
    dim, begin, end, step = given + [0, None, None, 1][len(given) :]
    if dim not in (-1, xv.dim() - 1) or step != 1 or (begin or 0) != start:
        return False
    return end == stop or (stop == xv.shape[-1] and (end is None or (isinstance(end, int) and end >= stop)))


def _is_rotate_half(node, x) -> bool:
    """node is cat((-x[..., d/2:], x[..., :d/2]), -1)."""
    xv = fake(x)
    if not is_call(node, aten.cat.default) or xv is None or not isinstance(xv.shape[-1], int) or xv.shape[-1] % 2:
        return False
    parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
    if len(parts) != 2 or dim not in (-1, xv.dim() - 1) or not is_call(parts[0], aten.neg.default):
        return False
    d = xv.shape[-1]
    return _last_dim_slice(parts[0].args[0], x, d // 2, d) and _last_dim_slice(parts[1], x, 0, d // 2)


def _products(node) -> list[tuple]:
    """(a, b) and (b, a) for a mul node a * b."""
    if not is_call(node, aten.mul.Tensor):
        return []
    a, b = node.args[:2]
    return [(a, b), (b, a)]


def _match(add: torch.fx.Node) -> _Rotation | None:
    if not is_call(add, aten.add.Tensor) or add.kwargs.get("alpha", 1) != 1:
        return None
    for plain, rotated in (add.args[:2], add.args[1::-1]):
        for x, cos in _products(plain):
            for half, sin in _products(rotated):
                if isinstance(x, torch.fx.Node) and _is_rotate_half(half, x):
                    return _partial(_Rotation(x, add, cos, sin, fake(x).shape[-1]))
    return None


def _partial(rot: _Rotation) -> _Rotation:
    """cat(rotated x[..., :r], x[..., r:]): the kernel rotates the first r dims of the whole x itself."""
    x, cat, r = rot.x, only_user(rot.out), rot.rot
    if not is_call(x, aten.slice.Tensor) or not is_call(cat, aten.cat.default) or cat.args[0][0] is not rot.out:
        return rot
    whole = x.args[0]
    wv = fake(whole)
    if wv is None or not isinstance(wv.shape[-1], int) or not _last_dim_slice(x, whole, 0, r):
        return rot
    dim = cat.args[1] if len(cat.args) > 1 else 0
    if (
        len(cat.args[0]) != 2
        or dim not in (-1, wv.dim() - 1)
        or not _last_dim_slice(cat.args[0][1], whole, r, wv.shape[-1])
    ):
        return rot
    return _Rotation(whole, cat, rot.cos, rot.sin, r)


def _table(node, xv: torch.Tensor, rot: int) -> torch.fx.Node | None:
    """The [b|1, s, rot] or [s, rot] tensor behind a cos/sin broadcast against x [b, h, s, d], else None."""
    tv = fake(node)
    if (
        tv is None
        or tv.dtype not in FLOAT_DTYPES
        or not same_size(tv.shape[-1], rot)
        or not same_size(tv.shape[-2], xv.shape[2])
    ):
        return None
    if tv.dim() == 2:
        return node
    if (
        tv.dim() == 4
        and same_size(tv.shape[1], 1)
        and (same_size(tv.shape[0], 1) or same_size(tv.shape[0], xv.shape[0]))
    ):
        if is_call(node, aten.unsqueeze.default) and node.args[1] == 1:
            return node.args[0]  # HF's cos.unsqueeze(1): the table before it
        return node  # squeezed when the call is built
    return None


def _kernel_inputs(rotation: _Rotation) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    xv, ov = fake(rotation.x), fake(rotation.out)
    if xv is None or ov is None or xv.dim() != 4 or xv.dtype not in FLOAT_DTYPES or ov.dtype != xv.dtype:
        return None
    cos, sin = _table(rotation.cos, xv, rotation.rot), _table(rotation.sin, xv, rotation.rot)
    if cos is None or sin is None or not same_shape(fake(cos), fake(sin)):
        return None
    return cos, sin


def _pairable(a: _Rotation, b: _Rotation) -> bool:
    av, bv = fake(a.x), fake(b.x)
    return av.dtype == bv.dtype and all(same_size(av.shape[i], bv.shape[i]) for i in (0, 2, 3))


def _squeezed(graph: torch.fx.Graph, table: torch.fx.Node, anchor: torch.fx.Node) -> torch.fx.Node:
    if fake(table).dim() == 4:
        return insert_call(graph, anchor, aten.squeeze.dim, (table, 1))
    return table


def fuse_rotary(ctx: PassContext) -> Counter:
    graph = ctx.graph
    report: Counter[str] = Counter()
    groups: dict[tuple, list[_Rotation]] = defaultdict(list)
    for node in graph.nodes:
        rotation = _match(node)
        tables = _kernel_inputs(rotation) if rotation is not None else None
        if tables is not None:
            groups[tables].append(rotation)
    for (cos, sin), rotations in groups.items():
        for a, b in zip(rotations[::2], rotations[1::2]):
            order = position(graph)
            last = max(a.out, b.out, key=order.get)
            first = a.out if last is b.out else b.out
            # One call where the later rotation was: the earlier one's readers must all come after it.
            if not _pairable(a, b) or any(order[u] <= order[last] for u in first.users):
                continue
            cos_in, sin_in = _squeezed(graph, cos, last), _squeezed(graph, sin, last)
            call = insert_call(graph, last, torch.ops.kernl.rotary.default, (a.x, b.x, cos_in, sin_in))
            call.meta.update({k: v for k, v in a.out.meta.items() if k not in ("val", "nn_module_stack")})
            items = [insert_call(graph, last, operator.getitem, (call, i)) for i in range(2)]
            for rotation, item in zip((a, b), items):
                rotation.out.replace_all_uses_with(item)
                erase_unused(rotation.out)
            report["rotary"] += 1
    return report
