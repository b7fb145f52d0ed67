"""How a value split across ranks along one dim flows through the ops between Megatron's linears.

A sharded value is described by the dim the ranks split and that dim's full size as blocks (segments): each
rank holds the same slice of every block, so a fused Q/K/V output [q | k | v] is held as [q_r | k_r | v_r].
Each rule reads the graph's fake values, which still have the full (unsharded) sizes, and returns the
description of the op's output, and the edit that rewrites its size constants for a rank. A rule raises
Unshardable for an op or a layout it does not understand; the caller then keeps the linears it came from whole.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx

from kernl.compiler.passes._fx import VIEW_OPS, fake, same_size

aten = torch.ops.aten

Edit = Callable[[int], None]  # applied with the world size, once the plan is decided


class Unshardable(Exception):
    """A value split across ranks reaches an op, or a layout, that this pass cannot split."""


@dataclass(frozen=True)
class Shard:
    dim: int  # the dim split across ranks (non-negative)
    segments: tuple[int, ...]  # its full size as blocks, each split in world_size equal contiguous parts
    roots: frozenset  # the column-parallel nodes the value comes from

    @property
    def size(self) -> int:
        return sum(self.segments)

    def moved(self, dim: int, segments: tuple[int, ...] | None = None) -> Shard:
        return Shard(dim, self.segments if segments is None else segments, self.roots)


@dataclass
class Requirement:
    """A size that must split evenly over the ranks: checked once the plan is decided."""

    size: int
    message: str  # says what the size counts; the world size is appended


def _static(value, where: str) -> int:
    if not isinstance(value, int):
        raise Unshardable(f"{where}: the split dim has a size known only at run time")
    return value


def _ndim(node: torch.fx.Node) -> int:
    val = fake(node)
    if val is None:
        raise Unshardable(f"{node.name}: no recorded shape")
    return val.dim()


def _product(sizes) -> object:
    return math.prod(sizes, start=1)


def _view(node: torch.fx.Node, shard: Shard, needs: list[Requirement]) -> tuple[Shard, Edit | None]:
    """A reshape: the split dim stays one dim (the same block of elements), is split (the ranks take the
    outermost part: heads from [heads * head_dim]) or merged as the outermost of several (back to features)."""
    src, out = fake(node.args[0]), fake(node)
    if src is None or out is None:
        raise Unshardable(f"{node.name}: no recorded shape")
    d = shard.dim
    full = _static(src.shape[d], node.name)
    before = _product(src.shape[:d])
    # The first output dim whose elements start where the split dim's do (size-1 dims skipped).
    j = next(
        (j for j in range(out.dim()) if same_size(_product(out.shape[:j]), before) and not same_size(out.shape[j], 1)),
        None,
    )
    if j is None:
        raise Unshardable(f"{node.name}: reshapes the split dim together with the dims before it")
    size = _static(out.shape[j], node.name)
    if size == full:
        new = shard.moved(j)
    elif size < full and full % size == 0 and len(shard.segments) == 1:
        # [.., heads * head_dim] → [.., heads, head_dim]: ranks take heads.
        inner = out.shape[j + 1 :]
        k = next((k for k in range(len(inner) + 1) if same_size(_product(inner[:k]) * size, full)), None)
        if k is None:
            raise Unshardable(f"{node.name}: splits the split dim into dims that do not cover it")
        new = shard.moved(j, (size,))
        needs.append(Requirement(size, f"{node.name}: {size} heads (a reshape of {full} features)"))
    elif size > full and size % full == 0:
        # [.., heads, head_dim] → [.., heads * head_dim]: the split dim must be the outermost of those merged.
        factor = size // full
        if not same_size(_product(src.shape[d + 1 :]), _product(out.shape[j + 1 :]) * factor):
            raise Unshardable(f"{node.name}: merges the split dim with dims outside it")
        new = shard.moved(j, tuple(s * factor for s in shard.segments))
    else:
        raise Unshardable(f"{node.name}: reshapes a dim of {len(shard.segments)} blocks in a way ranks cannot share")
    sizes = node.args[1]
    entry = sizes[j] if isinstance(sizes, (list, tuple)) and len(sizes) == out.dim() else None
    if isinstance(entry, torch.fx.Node) or entry is None:
        raise Unshardable(f"{node.name}: the split dim's size is not a constant of the reshape")
    if entry == -1:
        return new, None

    def edit(n: int) -> None:
        new_sizes = list(node.args[1])
        new_sizes[j] = size // n
        node.update_arg(1, new_sizes)

    return new, edit


def _bounds(segments: tuple[int, ...], start: int, end: int, where: str) -> tuple[int, int]:
    """Indices (i, j) of the blocks segments[i:j] that exactly cover [start, end)."""
    edges = [0]
    for s in segments:
        edges.append(edges[-1] + s)
    if start not in edges or end not in edges or start >= end:
        raise Unshardable(f"{where}: takes [{start}, {end}) of a split dim whose blocks end at {edges[1:]}")
    return edges.index(start), edges.index(end)


def _local(segments: tuple[int, ...], i: int, n: int) -> int:
    """Where block i starts in a rank's part."""
    return sum(s // n for s in segments[:i])


def _dim_arg(node: torch.fx.Node, index: int, name: str, default: int, ndim: int) -> int:
    value = node.args[index] if len(node.args) > index else node.kwargs.get(name, default)
    if not isinstance(value, int):
        raise Unshardable(f"{node.name}: a dim known only at run time")
    return value % ndim


def _slice(node: torch.fx.Node, shard: Shard, needs: list[Requirement]) -> tuple[Shard, Edit | None]:
    ndim = _ndim(node.args[0])
    if _dim_arg(node, 1, "dim", 0, ndim) != shard.dim:
        return shard, None
    args = list(node.args) + [None] * (5 - len(node.args))
    start, end, step = (node.kwargs.get(k, a) for k, a in zip(("start", "end", "step"), args[2:5]))
    if step not in (None, 1) or any(isinstance(v, torch.fx.Node) for v in (start, end)):
        raise Unshardable(f"{node.name}: a strided or run-time slice of the split dim")
    full = shard.size
    start = 0 if start is None else (start + full if start < 0 else min(start, full))
    end = full if end is None or end >= sys.maxsize else (end + full if end < 0 else min(end, full))
    i, j = _bounds(shard.segments, start, end, node.name)

    def edit(n: int) -> None:
        node.args = (node.args[0], node.args[1], _local(shard.segments, i, n), _local(shard.segments, j, n))
        node.kwargs = {}

    return shard.moved(shard.dim, shard.segments[i:j]), edit


def _split(node: torch.fx.Node, shard: Shard, needs: list[Requirement]) -> tuple[list, Edit | None]:
    ndim = _ndim(node.args[0])
    dim = _dim_arg(node, 2, "dim", 0, ndim)
    sizes_arg = node.args[1]
    full = shard.size
    if isinstance(sizes_arg, int):
        sizes = [min(sizes_arg, full - a) for a in range(0, full, sizes_arg)]
    elif isinstance(sizes_arg, (list, tuple)) and all(isinstance(s, int) for s in sizes_arg):
        sizes = list(sizes_arg)
    else:
        raise Unshardable(f"{node.name}: split sizes known only at run time")
    if dim != shard.dim:
        return [shard] * len(sizes), None
    parts, start = [], 0
    for size in sizes:
        i, j = _bounds(shard.segments, start, start + size, node.name)
        parts.append(shard.moved(dim, shard.segments[i:j]))
        start += size

    def edit(n: int) -> None:
        local = [p.size // n for p in parts]
        if isinstance(sizes_arg, int):
            node.update_arg(1, local[0])  # equal parts stay equal: each is a whole number of blocks
        else:
            node.update_arg(1, local)

    return parts, edit


def _transpose(node: torch.fx.Node, shard: Shard, needs: list[Requirement]) -> tuple[Shard, None]:
    ndim = _ndim(node.args[0])
    if node.target is aten.t.default:
        a, b = 0, 1
    else:
        a, b = node.args[1] % ndim, node.args[2] % ndim
    d = shard.dim
    return shard.moved(b if d == a else a if d == b else d), None


def _permute(node: torch.fx.Node, shard: Shard, needs: list[Requirement]) -> tuple[Shard, None]:
    ndim = _ndim(node.args[0])
    order = [d % ndim for d in node.args[1]]
    return shard.moved(order.index(shard.dim)), None


def _unsqueeze(node: torch.fx.Node, shard: Shard, needs: list[Requirement]) -> tuple[Shard, None]:
    k = node.args[1] % (_ndim(node.args[0]) + 1)
    return shard.moved(shard.dim + (k <= shard.dim)), None


def _squeeze(node: torch.fx.Node, shard: Shard, needs: list[Requirement]) -> tuple[Shard, None]:
    ndim = _ndim(node.args[0])
    dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    dims = [d % ndim for d in dims]
    if shard.dim in dims:
        raise Unshardable(f"{node.name}: squeezes the split dim")
    return shard.moved(shard.dim - sum(d < shard.dim for d in dims)), None


def _expand(node: torch.fx.Node, shard: Shard, needs: list[Requirement]) -> tuple[Shard, Edit | None]:
    sizes = list(node.args[1])
    j = shard.dim + len(sizes) - _ndim(node.args[0])
    if isinstance(sizes[j], torch.fx.Node):
        raise Unshardable(f"{node.name}: expands the split dim to a size known only at run time")
    if sizes[j] == -1:
        return shard.moved(j), None

    def edit(n: int) -> None:
        new = list(node.args[1])
        new[j] = shard.size // n
        node.update_arg(1, new)

    return shard.moved(j), edit


# Element-wise ops whose tensor operands all have the output's shape: each rank computes its own part.
POINTWISE = {
    aten.alias.default, aten.clone.default, aten.contiguous.default, aten.detach.default, aten.to.dtype,
    aten.to.dtype_layout, aten._to_copy.default, aten.gelu.default, aten.silu.default, aten.relu.default,
    aten.tanh.default, aten.sigmoid.default, aten.neg.default, aten.exp.default, aten.erf.default,
    aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.div.Tensor,
    aten.div.Scalar, aten.pow.Tensor_Scalar,
}  # fmt: skip


def pointwise(node: torch.fx.Node, shards: dict) -> Shard:
    """An element-wise op of split values: split as they are (all alike, none broadcast)."""
    out = fake(node)
    tensors = [a for a in node.all_input_nodes if isinstance(fake(a), torch.Tensor)]
    found = [shards.get(a) for a in tensors]
    first = found[0] if found[0] is not None else next(s for s in found if s is not None)
    for a, s in zip(tensors, found):
        if s is None or (s.dim, s.segments) != (first.dim, first.segments):
            raise Unshardable(f"{node.name}: combines a split value with one split otherwise (or not at all)")
        if out is None or tuple(fake(a).shape) != tuple(out.shape):
            raise Unshardable(f"{node.name}: broadcasts a split value")
    return Shard(first.dim, first.segments, frozenset().union(*(s.roots for s in found)))


# Rules for ops with one tensor input that is split: (node, its input's Shard, requirements) -> (Shard, edit).
SINGLE_INPUT = {
    **dict.fromkeys(VIEW_OPS, _view),
    aten.slice.Tensor: _slice,
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split,
    aten.transpose.int: _transpose,
    aten.t.default: _transpose,
    aten.permute.default: _permute,
    aten.unsqueeze.default: _unsqueeze,
    aten.squeeze.dim: _squeeze,
    aten.squeeze.dims: _squeeze,
    aten.expand.default: _expand,
}


def getitem(node: torch.fx.Node, shards: dict) -> Shard | None:
    """One result of a multi-output op (split, rotary), whose results are described one by one."""
    parts = shards.get(node.args[0])
    if not isinstance(parts, (list, tuple)):
        raise Unshardable(f"{node.name}: picks from a split value that is not a list of results")
    return parts[node.args[1]]
