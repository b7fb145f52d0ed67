"""aten.scaled_dot_product_attention → kernl.attention, with its mask, causal flag, scale and GQA folded in.

HF's repeat_kv (k, v [b, hkv, s, d] → unsqueeze(2) → expand [b, hkv, n, s, d] → reshape [b, hkv*n, s, d])
is undone: the kernel reads kv head h // n for query head h, which is exactly what the repeat built.
A mask that is an expand of a smaller tensor is passed un-expanded: the kernel broadcasts it.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx

from kernl.compiler.passes._fx import (
    FLOAT_DTYPES,
    VIEW_OPS,
    arg,
    fake,
    is_call,
    replace_with_call,
    same_shape,
    same_size,
)
from kernl.compiler.passes.context import PassContext
from kernl.kernels.attention import MAX_HEAD_DIM

aten = torch.ops.aten


def _through_full_slices(node):
    """Look through x[:, :] style slices that keep every element (HF's `x[:, :, None]` may export with them)."""
    while is_call(node, aten.slice.Tensor) and fake(node) is not None and fake(node.args[0]) is not None:
        if not same_shape(fake(node), fake(node.args[0])) or (len(node.args) > 4 and node.args[4] != 1):
            break
        node = node.args[0]
    return node


def unrepeated(node) -> tuple[torch.fx.Node, int] | None:
    """(k, n) when node is HF's repeat_kv of k by n (n >= 1), else None."""
    if not is_call(node, *VIEW_OPS):
        return None
    expand = node.args[0]
    if is_call(expand, aten.clone.default):  # reshape of an expand may show up as clone + view
        expand = expand.args[0]
    if not is_call(expand, aten.expand.default):
        return None
    unsq = _through_full_slices(expand.args[0])
    if not is_call(unsq, aten.unsqueeze.default) or unsq.args[1] not in (2, -3):
        return None
    source = _through_full_slices(unsq.args[0])
    k, rep, out = fake(source), fake(expand), fake(node)
    if k is None or rep is None or out is None or k.dim() != 4 or rep.dim() != 5 or out.dim() != 4:
        return None
    heads, n = k.shape[1], rep.shape[2]
    if not (isinstance(heads, int) and isinstance(n, int)) or n < 1:
        return None
    # [b, h, s, d] → [b, h, n, s, d] → [b, h * n, s, d], nothing else moved.
    kept = [(rep.shape[0], k.shape[0]), (rep.shape[1], heads), (rep.shape[3], k.shape[2]), (rep.shape[4], k.shape[3])]
    flat = [
        (out.shape[0], k.shape[0]),
        (out.shape[1], heads * n),
        (out.shape[2], k.shape[2]),
        (out.shape[3], k.shape[3]),
    ]
    if not all(same_size(a, b) for a, b in kept + flat):
        return None
    return source, n


def unexpanded_mask(mask, target: tuple) -> torch.fx.Node | None:
    """The smallest tensor along a chain of expands that still broadcasts to target."""
    while is_call(mask, aten.expand.default) and broadcasts(fake(mask.args[0]), target):
        mask = mask.args[0]
    return mask


def broadcasts(mask: torch.Tensor | None, target: tuple) -> bool:
    if mask is None or mask.dim() > 4:
        return False
    padded = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    return all(same_size(m, 1) or same_size(m, t) for m, t in zip(padded, target))


def _attention_args(node: torch.fx.Node) -> tuple | None:
    """kernl.attention's (q, k, v, mask, causal, scale) for an sdpa node it can run, else None."""
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
    dropout, causal = arg(node, 4, "dropout_p", 0.0), arg(node, 5, "is_causal", False)
    scale, gqa = node.kwargs.get("scale"), node.kwargs.get("enable_gqa", False)
    qv, kv, vv = fake(q), fake(k), fake(v)
    if qv is None or kv is None or vv is None or dropout != 0 or not isinstance(causal, bool):
        return None
    if any(t.dim() != 4 or t.dtype != qv.dtype for t in (kv, vv)) or qv.dtype not in FLOAT_DTYPES:
        return None
    head_dim = qv.shape[3]
    if not isinstance(head_dim, int) or not 1 <= head_dim <= MAX_HEAD_DIM or not same_size(vv.shape[3], head_dim):
        return None
    if not isinstance(scale, (int, float, type(None))):
        return None
    folded = (uk := unrepeated(k)) is not None and (uv := unrepeated(v)) is not None and uk[1] == uv[1]
    if folded:
        k, v, kv = uk[0], uv[0], fake(uk[0])
    # The kernel: q head h reads kv head h // (hq // hkv): repeat_kv's and enable_gqa's layout both.
    hq, hkv = qv.shape[1], kv.shape[1]
    if not (isinstance(hq, int) and isinstance(hkv, int)) or hkv == 0 or hq % hkv:
        return None
    if hq != hkv and not (folded or gqa):
        return None  # fewer kv heads without enable_gqa is an error in torch: leave it to torch
    if not (same_size(kv.shape[0], qv.shape[0]) and same_size(kv.shape[3], head_dim)):
        return None
    # torch's is_causal is top-left aligned, the kernel's bottom-right: the same only when sq == sk.
    if causal and not same_size(qv.shape[2], kv.shape[2]):
        return None
    if mask is not None:
        mv = fake(mask)
        target = (qv.shape[0], hq, qv.shape[2], kv.shape[2])
        if mv is None or mv.dtype not in (torch.bool, *FLOAT_DTYPES) or not broadcasts(mv, target):
            return None
        mask = unexpanded_mask(mask, target)
    return q, k, v, mask, causal, None if scale is None else float(scale)


def fuse_attention(ctx: PassContext) -> Counter:
    graph = ctx.graph
    report: Counter[str] = Counter()
    for node in list(graph.nodes):
        if not is_call(node, aten.scaled_dot_product_attention.default):
            continue
        args = _attention_args(node)
        if args is None:
            continue
        new = replace_with_call(graph, node, torch.ops.kernl.attention.default, args)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        report["attention"] += 1
    return report
