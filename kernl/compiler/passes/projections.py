"""Linears reading the same input (Q, K, V; gate and up when not gated) → one linear over concatenated weights.

The weights (and biases) are concatenated once at compile time into a new weight input; each consumer
reads its columns through a slice of the last dim, a strided view, so no copy is made. One wide GEMM
reads x once and fills the GPU better than three narrow ones. Runs before the linear pass, which then
turns the wide aten.linear into kernl.linear.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections import Counter, defaultdict

import torch
import torch.fx

from kernl.compiler.passes._fx import FLOAT_DTYPES, arg, fake, insert_call, is_call
from kernl.compiler.passes.context import PassContext

aten = torch.ops.aten


def _weight(node, ctx: PassContext) -> torch.Tensor | None:
    if isinstance(node, torch.fx.Node) and node.op == "placeholder" and node.name in ctx.weights:
        return ctx.weights[node.name]
    return None


def _fusable(node: torch.fx.Node, ctx: PassContext) -> bool:
    """A linear whose weight (and bias, if any) are compile-time weights, in x's float dtype."""
    if not is_call(node, aten.linear.default):
        return False
    x, weight, bias = fake(node.args[0]), _weight(node.args[1], ctx), arg(node, 2, "bias")
    if x is None or weight is None or weight.dim() != 2 or x.dtype not in FLOAT_DTYPES or weight.dtype != x.dtype:
        return False
    b = _weight(bias, ctx)
    return bias is None or (b is not None and b.shape == weight.shape[:1] and b.dtype == x.dtype)


MAX_NAME = 200  # weight names are manifest entries (at most 512 characters)


def _fused_name(nodes: list[torch.fx.Node]) -> str:
    """p_layers_0_self_attn_{q,k,v}_proj_weight → p_layers_0_self_attn_fused_q_k_v_proj_weight."""
    names = [n.name for n in nodes]
    prefix = os.path.commonprefix(names)
    suffix = os.path.commonprefix([n[len(prefix) :][::-1] for n in names])[::-1]
    middles = [n[len(prefix) : len(n) - len(suffix)] for n in names]
    name = f"{prefix}fused_{'_'.join(middles)}{suffix}"
    if len(name) > MAX_NAME:  # e.g. every decoder layer's cross k/v projection of one encoder output
        digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
        name = f"{prefix[: MAX_NAME // 2]}fused_{len(names)}_{digest}{suffix[-MAX_NAME // 4 :]}"
    return name


def _common_module_stack(group: list[torch.fx.Node]) -> dict | None:
    """The modules every linear of the group sits in (e.g. self_attn for q/k/v_proj), for the program's comments."""
    stacks = [n.meta.get("nn_module_stack") or {} for n in group]
    common = {k: v for k, v in stacks[0].items() if all(s.get(k) == v for s in stacks[1:])}
    return common or None


@torch.no_grad()
def _fuse(ctx: PassContext, group: list[torch.fx.Node]) -> None:
    graph = ctx.graph
    weights = [ctx.weights[n.args[1].name].detach() for n in group]
    biases = [arg(n, 2, "bias") for n in group]
    name = _fused_name([n.args[1] for n in group])
    weight = ctx.add_weight(name, torch.cat(weights, dim=0))
    bias = None
    if any(b is not None for b in biases):
        # A linear without bias gets zeros: adding them costs nothing in the kernel's epilogue.
        parts = [
            ctx.weights[b.name].detach() if b is not None else w.new_zeros(w.shape[:1]) for b, w in zip(biases, weights)
        ]
        bias_name = name.removesuffix("weight") + "bias" if name.endswith("weight") else name + "_bias"
        bias = ctx.add_weight(bias_name, torch.cat(parts))
    first = group[0]
    wide = insert_call(graph, first, aten.linear.default, (first.args[0], weight, bias))
    stack = _common_module_stack(group)
    if stack is None:
        wide.meta.pop("nn_module_stack", None)
    else:
        wide.meta["nn_module_stack"] = stack
    bounds = list(itertools.accumulate((w.shape[0] for w in weights), initial=0))
    parts = [insert_call(graph, first, aten.slice.Tensor, (wide, -1, a, b)) for a, b in zip(bounds, bounds[1:])]
    for node, part in zip(group, parts):
        part.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        for user in list(node.users):
            if is_call(user, aten.view.default):
                # view of a column slice: fine for HF's head split, but reshape never fails (and never copies
                # where view would have worked).
                user.target = aten.reshape.default
        node.replace_all_uses_with(part)
        graph.erase_node(node)


def fuse_projections(ctx: PassContext) -> Counter:
    groups: dict[torch.fx.Node, list[torch.fx.Node]] = defaultdict(list)
    for node in ctx.graph.nodes:
        if _fusable(node, ctx):
            groups[node.args[0]].append(node)
    report: Counter[str] = Counter()
    for group in groups.values():
        if len(group) < 2:
            continue
        _fuse(ctx, group)
        report["fused_projections"] += 1
    return report
