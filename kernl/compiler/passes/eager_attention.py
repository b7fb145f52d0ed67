"""Attention written out by hand (HF's eager_attention_forward) → kernl.attention, its additive terms as the mask.

Matched by what it computes, from the softmax outwards:

    scores = matmul(q, k^T)                 k^T: transpose/permute of k's last two dims (or any [.., d, sk] tensor)
    scores = scores * c  |  scores / c      any number of constant scalings, folded into the kernel's scale
    scores = scores + bias_1 (+ bias_2 …)   float tensors broadcastable to [batch, heads, seq_q, seq_k]: T5's
                                            position bias, an additive padding/causal mask
    probs  = softmax(scores, -1)            optionally softmax(.., dtype=float32) then a cast back to q's dtype
    out    = matmul(probs, v)

→ kernl.attention(q, k, v, mask, False, scale), mask = bias_1 (+ bias_2 …) un-expanded (or None), scale = the
product of the constant scalings (1.0 when there is none: T5 does not scale). HF's repeat_kv on k and v is
undone as in the sdpa pass. The output keeps the value of the matmul it replaces; its layout is the kernel's
([batch, seq_q, heads, head_dim] in memory), so a direct `view` of it becomes a `reshape`.

Left as aten: dropout still in the graph (train mode: remove_inference_noops drops it in eval), softmax over
another dim, attention probabilities read elsewhere (output_attentions), scalings after a bias was added, a
bias that is not a float tensor of a broadcastable shape, 3-D (bmm) attention, head_dim above the kernel's.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx

from kernl.compiler.passes._fx import (
    FLOAT_DTYPES,
    erase_unused,
    fake,
    infer_val,
    is_call,
    only_user,
    other_operand,
    replace_with_call,
    same_shape,
    same_size,
)
from kernl.compiler.passes.attention import broadcasts, unexpanded_mask, unrepeated
from kernl.compiler.passes.context import PassContext
from kernl.kernels.attention import MAX_HEAD_DIM

aten = torch.ops.aten

_SOFTMAX = (aten.softmax.int, aten._softmax.default)
_CASTS = (aten.to.dtype, aten._to_copy.default, aten.type_as.default)


@dataclass
class EagerAttention:
    """One matched eager attention: what kernl.attention gets, and the node whose value it replaces."""

    q: torch.fx.Node
    k: torch.fx.Node  # [batch, heads_kv, seq_k, head_dim] (k^T's source, repeat_kv undone)
    v: torch.fx.Node
    biases: list[torch.fx.Node]  # additive float terms, in the order the graph adds them
    scale: float
    output: torch.fx.Node  # matmul(probs, v)


def _softmax_dim_ok(node: torch.fx.Node, ndim: int) -> bool:
    dim = node.args[1]
    if is_call(node, aten._softmax.default) and node.args[2] is not False:
        return False  # half_to_float: the output dtype differs from the scores'
    return isinstance(dim, int) and dim in (-1, ndim - 1)


def _probs_consumer(softmax: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node | None:
    """The matmul(probs, v) reading softmax's value, through casts back to q's dtype; None when probs leak."""
    node = softmax
    while True:
        user = only_user(node)
        if user is None:
            return None
        if is_call(user, *_CASTS) and user.args[0] is node:
            node = user
            continue
        if is_call(user, aten.matmul.default) and user.args[0] is node and user.args[1] is not node:
            out = fake(node)
            return user if out is not None and out.dtype == dtype else None
        return None


def _key_of(kt: torch.fx.Node) -> torch.fx.Node | None:
    """k for k^T = transpose(k, -2, -1) or an equivalent permute; None for anything else."""
    kv = fake(kt)
    if kv is None or kv.dim() != 4:
        return None
    if is_call(kt, aten.transpose.int) and {d % 4 for d in kt.args[1:3]} == {2, 3}:
        return kt.args[0]
    if is_call(kt, aten.permute.default) and [d % 4 for d in kt.args[1]] == [0, 1, 3, 2]:
        return kt.args[0]
    return None


def _scaling(node: torch.fx.Node) -> tuple[torch.fx.Node, float] | None:
    """(scores, c) when node is scores * c, c * scores or scores / c with a plain number c."""
    if not (is_call(node, aten.mul.Tensor, aten.div.Tensor) and len(node.args) == 2 and not node.kwargs):
        return None
    a, b = node.args
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    if is_call(node, aten.div.Tensor):
        return (a, 1.0 / float(b)) if isinstance(a, torch.fx.Node) and number(b) and b != 0 else None
    if isinstance(a, torch.fx.Node) and number(b):
        return a, float(b)
    if isinstance(b, torch.fx.Node) and number(a):
        return b, float(a)
    return None


def _walk_scores(node, *, allow_bias: bool) -> tuple[torch.fx.Node, list, float] | None:
    """(matmul(q, k^T), biases in the order they are added, scale) for the scores softmax reads, else None.

    From the softmax inwards: adds of a bias (the scores on either side), then constant scalings, then the matmul.
    A scaling of scores that already hold a bias would scale the bias too: not the kernel's s * scale + mask.
    Every step must be read by the next one only (scores read elsewhere stay as they are).
    """
    if not isinstance(node, torch.fx.Node) or len(node.users) != 1:
        return None
    if is_call(node, aten.matmul.default):
        return node, [], 1.0
    if allow_bias and is_call(node, aten.add.Tensor) and node.kwargs.get("alpha", 1) == 1 and len(node.args) == 2:
        for scores in node.args:  # HF writes scores + bias; a bias + scores is found on the second try
            walked = _walk_scores(scores, allow_bias=True)
            bias = other_operand(node, scores)
            if walked is not None and isinstance(bias, torch.fx.Node) and bias is not scores:
                matmul, biases, scale = walked
                return matmul, [*biases, bias], scale
        return None
    scaled = _scaling(node)
    if scaled is not None:
        walked = _walk_scores(scaled[0], allow_bias=False)
        return None if walked is None else (walked[0], walked[1], walked[2] * scaled[1])
    return None


def match_eager_attention(softmax: torch.fx.Node) -> EagerAttention | None:
    """The eager attention around this softmax node, or None when it is not one kernl.attention can run."""
    if not is_call(softmax, *_SOFTMAX) or (is_call(softmax, aten.softmax.int) and len(softmax.args) > 3):
        return None
    sv = fake(softmax)
    if sv is None or sv.dim() != 4 or not _softmax_dim_ok(softmax, 4):
        return None
    walked = _walk_scores(softmax.args[0], allow_bias=True)
    if walked is None:
        return None
    node, biases, scale = walked
    q, kt = node.args[:2]
    k = _key_of(kt)
    qv, scores = fake(q), fake(node)
    if k is None or qv is None or scores is None or qv.dim() != 4 or qv.dtype not in FLOAT_DTYPES:
        return None
    if not same_shape(scores, sv):
        return None  # a bias wider than the scores would broadcast them
    output = _probs_consumer(softmax, qv.dtype)
    if output is None:
        return None
    v = output.args[1]
    found = _checked(q, k, v, biases, scores, output)
    if found is None:
        return None
    k, v = found
    return EagerAttention(q, k, v, biases, scale, output)


def _checked(q, k, v, biases, scores, output) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(k, v) with repeat_kv undone when the shapes and dtypes fit the kernel, else None."""
    qv, kv, vv, ov = fake(q), fake(k), fake(v), fake(output)
    if kv is None or vv is None or ov is None or kv.dim() != 4 or vv.dim() != 4:
        return None
    if not (kv.dtype == vv.dtype == qv.dtype == scores.dtype == ov.dtype):
        return None
    head_dim = qv.shape[3]
    if not isinstance(head_dim, int) or not 1 <= head_dim <= MAX_HEAD_DIM:
        return None
    if not (same_size(kv.shape[3], head_dim) and same_size(vv.shape[3], head_dim)):
        return None  # the kernel's v has k's shape: a wider value head is left to aten
    # No broadcasting between q, k and v: the same batch and heads, k and v of one length.
    if not all(same_size(a, b) for a, b in zip(qv.shape[:2], kv.shape[:2])):
        return None
    if not all(same_size(a, b) for a, b in zip(kv.shape[:3], vv.shape[:3])):
        return None
    target = (qv.shape[0], qv.shape[1], qv.shape[2], kv.shape[2])
    for bias in biases:
        bv = fake(bias)
        if bv is None or bv.dtype not in FLOAT_DTYPES or not broadcasts(bv, target):
            return None
    uk, uv = unrepeated(k), unrepeated(v)
    if uk is not None and uv is not None and uk[1] == uv[1]:
        k, v = uk[0], uv[0]  # the kernel reads kv head h // n itself
    return k, v


def _mask(graph: torch.fx.Graph, found: EagerAttention, target: tuple) -> torch.fx.Node | None:
    """One additive mask for the kernel: the single bias un-expanded, or the biases summed (broadcast by add)."""
    if not found.biases:
        return None
    masks = [unexpanded_mask(b, target) for b in found.biases]
    total = masks[0]
    for other in masks[1:]:
        with graph.inserting_before(found.output):
            total = graph.call_function(aten.add.Tensor, (total, other))
        total.meta.update({k: v for k, v in found.output.meta.items() if k != "val"})
        infer_val(total)
    return total


def rewrite_eager_attention(graph: torch.fx.Graph, found: EagerAttention) -> torch.fx.Node:
    """Replace one matched attention by a kernl.attention call; returns the new node. The caller may then run
    graph.eliminate_dead_code() (the matched nodes are erased here when nothing else reads them)."""
    qv, kv = fake(found.q), fake(found.k)
    target = (qv.shape[0], qv.shape[1], qv.shape[2], kv.shape[2])
    mask = _mask(graph, found, target)
    args = (found.q, found.k, found.v, mask, False, found.scale)
    new = replace_with_call(graph, found.output, torch.ops.kernl.attention.default, args)
    infer_val(new)  # the kernel's strides, not the matmul's
    for user in list(found.output.users):
        if is_call(user, aten.view.default):
            user.target = aten.reshape.default  # a view of the kernel's layout may need a copy
    found.output.replace_all_uses_with(new)
    erase_unused(found.output)
    return new


def fuse_eager_attention(ctx: PassContext) -> Counter:
    """Every eager attention of ctx.graph onto kernl.attention; counter "eager_attention"."""
    graph = ctx.graph
    report: Counter[str] = Counter()
    for node in list(graph.nodes):
        if not is_call(node, *_SOFTMAX):
            continue
        found = match_eager_attention(node)
        if found is None:
            continue
        rewrite_eager_attention(graph, found)
        report["eager_attention"] += 1
    return report


__all__ = ["EagerAttention", "fuse_eager_attention", "match_eager_attention", "rewrite_eager_attention"]
