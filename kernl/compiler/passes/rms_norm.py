"""HF's RMSNorm subgraph → kernl.rms_norm; an add feeding it → kernl.add_rms_norm, which returns the sum too.

Matched by what it computes, from the rsqrt outwards (and torch's own aten.rms_norm, from nn.RMSNorm):
    x32 = x.float();  n = x32 * rsqrt(mean(x32 ** 2, -1, keepdim) + eps)
    Llama: weight * n.to(x.dtype)          Gemma: (n * (1 + weight.float())).type_as(x)  → weight_offset 1
eps is read from the graph. Casts to fp32 (or to the same dtype) are looked through: the kernel
computes in fp32 and returns x's dtype.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx

from kernl.compiler.passes._fx import (
    FLOAT_DTYPES,
    arg,
    erase_unused,
    fake,
    fuse_add_into_norm,
    insert_call,
    is_call,
    only_user,
    other_operand,
    position,
    same_shape,
    scalar_operand,
)
from kernl.compiler.passes.context import PassContext
from kernl.kernels.layer_norm import MAX_HIDDEN

aten = torch.ops.aten

CASTS = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default)


def _is_cast(node) -> bool:
    """A dtype-only conversion: same shape and device, no other effect at inference."""
    if not is_call(node, *CASTS):
        return False
    src, out = fake(node.args[0]), fake(node)
    return src is not None and out is not None and src.shape == out.shape and src.device == out.device


def _source(node):
    """Look through casts to fp32 or to the same dtype (which lose nothing) to the tensor they read."""
    while _is_cast(node) and fake(node).dtype in (torch.float32, fake(node.args[0]).dtype):
        node = node.args[0]
    return node


def _weight_and_offset(node) -> tuple[torch.fx.Node, float] | None:
    """(weight, 0.0) for a weight, (weight, 1.0) for 1 + weight (Gemma), casts looked through."""
    node = _source(node)
    for operand in node.args[:2] if is_call(node, aten.add.Tensor) else ():
        if isinstance(operand, torch.fx.Node) and scalar_operand(node, aten.add.Tensor, operand) == 1.0:
            return _source(operand), 1.0
    return (node, 0.0) if isinstance(node, torch.fx.Node) else None


def _normalized(rsqrt: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, float] | None:
    """(x, the node computing x * rsqrt(mean(x^2) + eps), eps) around this rsqrt, else None."""
    add = rsqrt.args[0]
    mean = next((a for a in add.args[:2] if is_call(a, aten.mean.dim)), None) if is_call(add, aten.add.Tensor) else None
    eps = scalar_operand(add, aten.add.Tensor, mean) if mean is not None else None
    if eps is None or eps < 0 or arg(mean, 2, "keepdim", False) is not True or mean.kwargs.get("dtype"):
        return None
    square = mean.args[0]
    sv = fake(square)
    if sv is None or list(mean.args[1]) not in ([-1], [sv.dim() - 1]):
        return None
    if is_call(square, aten.pow.Tensor_Scalar) and square.args[1] == 2:
        x = square.args[0]
    elif is_call(square, aten.mul.Tensor) and square.args[0] is square.args[1]:
        x = square.args[0]
    else:
        return None
    out = only_user(rsqrt)
    if not is_call(out, aten.mul.Tensor) or _source(other_operand(out, rsqrt)) is not _source(x):
        return None
    return _source(x), out, eps


def _rms_norm_args(rsqrt: torch.fx.Node) -> tuple[torch.fx.Node, tuple] | None:
    """(node whose value the kernel computes, (x, weight, eps, weight_offset)), else None."""
    found = _normalized(rsqrt)
    if found is None:
        return None
    x, node, eps = found
    while _is_cast(only_user(node)):
        node = only_user(node)
    scale = only_user(node)
    if not is_call(scale, aten.mul.Tensor) or list(scale.args[:2]).count(node) != 1:
        return None
    weighted = _weight_and_offset(other_operand(scale, node))
    if weighted is None:
        return None
    weight, offset = weighted
    out = scale
    while _is_cast(only_user(out)):
        out = only_user(out)
    xv, wv, ov = fake(x), fake(weight), fake(out)
    if xv is None or wv is None or ov is None or xv.dtype not in FLOAT_DTYPES or wv.dtype not in FLOAT_DTYPES:
        return None
    hidden = xv.shape[-1]
    if not isinstance(hidden, int) or not 1 <= hidden <= MAX_HIDDEN or tuple(wv.shape) != (hidden,):
        return None
    # The kernel returns x's dtype and shape: the subgraph must too (no promotion by an fp32 weight).
    if ov.dtype != xv.dtype or not same_shape(ov, xv):
        return None
    return out, (x, weight, float(eps), offset)


def _aten_rms_norm_args(node: torch.fx.Node) -> tuple[torch.fx.Node, tuple] | None:
    """torch.nn.RMSNorm / F.rms_norm as exported: aten.rms_norm(x, [hidden], weight, eps)."""
    x, shape, weight, eps = node.args[0], arg(node, 1, "normalized_shape"), arg(node, 2, "weight"), arg(node, 3, "eps")
    xv, wv = fake(x), fake(weight)
    if (
        xv is None
        or wv is None
        or xv.dtype not in FLOAT_DTYPES
        or wv.dtype not in FLOAT_DTYPES
        or len(shape or ()) != 1
    ):
        return None
    hidden = xv.shape[-1]
    if not isinstance(hidden, int) or not 1 <= hidden <= MAX_HIDDEN or tuple(wv.shape) != (hidden,):
        return None
    # eps=None is the input dtype's machine epsilon in torch.
    return node, (x, weight, float(torch.finfo(xv.dtype).eps if eps is None else eps), 0.0)


def _fusable_add(node) -> bool:
    """A plain add of two same-shape, same-dtype tensors (no broadcast, no alpha): the residual stream."""
    if not is_call(node, aten.add.Tensor) or node.kwargs.get("alpha", 1) != 1:
        return False
    a, b, out = (fake(x) for x in (*node.args[:2], node))
    return (
        a is not None
        and b is not None
        and same_shape(a, out)
        and same_shape(b, out)
        and a.dtype == b.dtype == out.dtype
    )


def fuse_rms_norm(ctx: PassContext) -> Counter:
    graph = ctx.graph
    report: Counter[str] = Counter()
    for node in list(graph.nodes):
        if is_call(node, aten.rsqrt.default):
            found = _rms_norm_args(node)
        else:
            found = _aten_rms_norm_args(node) if is_call(node, aten.rms_norm.default) else None
        if found is None:
            continue
        out, (x, weight, eps, offset) = found
        order = position(graph)
        if _fusable_add(x) and order[weight] < order[x]:
            fuse_add_into_norm(graph, x, out, torch.ops.kernl.add_rms_norm.default, (weight, eps, offset))
            report["add_rms_norm"] += 1
        else:
            normed = insert_call(graph, out, torch.ops.kernl.rms_norm.default, (x, weight, eps, offset))
            normed.meta.update({k: v for k, v in out.meta.items() if k != "val"})
            out.replace_all_uses_with(normed)
            report["rms_norm"] += 1
        erase_unused(out)  # the pattern's nodes
        erase_unused(x)  # the add it absorbed (a no-op when x is still read)
    return report
