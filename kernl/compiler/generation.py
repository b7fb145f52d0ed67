"""A causal LM's rewritten graph → the two entries of a generation bundle: prefill and decode step.

Both come from one export of `forward(input_ids, position_ids)`, after the rewrite passes, so they share its
weights and kernels. Each layer's kernl.attention node shows where that layer's keys and values are (after
rotary, before any repeat for grouped heads):

- prefill(…caches, input_ids [b, s], position_ids [b, s], last [b], rows [b]): prompts are right-padded, so
  causal attention alone keeps a real token from seeing pads. After each attention the layer's k/v go into
  cache rows `rows` at positions [0, s); the LM head runs on the hidden state at each row's `last` position
  only (a 512-token prompt would otherwise compute 512 × vocab logits to keep one row).
- decode(…caches, input_ids [b, 1], position_ids [b, 1]): each attention becomes decode_attention_append,
  which writes the token's k/v at the row's own position and attends over [0, position] of that row.

Logits come out as [b, vocab]. The caches are [rows, heads_kv, max_len, head_dim] per layer (k and v).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx

from kernl.compiler.passes._fx import VIEW_OPS, fake, is_call
from kernl.errors import KernlError
from kernl.kernels.attention import MAX_HEAD_DIM

aten = torch.ops.aten
kernl_ops = torch.ops.kernl

PREFILL, DECODE = "prefill", "decode"
GENERATION_INPUTS = ("input_ids", "position_ids")
PREFILL_EXTRA = ("last", "rows")


@dataclass(frozen=True)
class CacheLayout:
    layers: int
    heads_kv: int
    head_dim: int
    dtype: torch.dtype

    def state(self, rows: int, max_len: int) -> list[dict]:
        """The program's state tensors: k and v of each layer, [rows, heads_kv, max_len, head_dim]."""
        shape = [rows, self.heads_kv, max_len, self.head_dim]
        dtype = str(self.dtype).removeprefix("torch.")
        return [
            {"name": f"cache_{kind}_{i}", "dtype": dtype, "shape": shape} for i in range(self.layers) for kind in "kv"
        ]


def _attentions(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    nodes = [n for n in graph.nodes if is_call(n, kernl_ops.attention.default)]
    if not nodes:
        raise KernlError(
            "generation: no attention of the model was rewritten onto kernl's kernel; cannot cache it" + _left(graph)
        )
    return nodes


def _left(graph: torch.fx.Graph) -> str:
    """What the error can say about attentions left on torch: their shapes, against what the kernel takes."""
    left = [n for n in graph.nodes if is_call(n, aten.scaled_dot_product_attention.default)]
    if not left:
        return " (the exported graph has no scaled_dot_product_attention either)"
    shapes = ", ".join(
        f"{name} {list(t.shape) if t is not None else '?'}"
        for name, t in zip("qkv", (fake(a) for a in left[0].args[:3]), strict=True)
    )
    return (
        f" ({len(left)} scaled_dot_product_attention call(s) stay on torch; the first has {shapes}; kernl's kernel "
        f"takes 4-D q/k/v of one float dtype, head_dim up to {MAX_HEAD_DIM}, no dropout)"
    )


def cache_layout(gm: torch.fx.GraphModule) -> CacheLayout:
    """Heads, head size and dtype of the cache, the same for every layer (else KernlError)."""
    shapes = set()
    for node in _attentions(gm.graph):
        k = fake(node.args[1])
        if k is None or not isinstance(k.shape[1], int) or not isinstance(k.shape[3], int):
            raise KernlError(f"generation: {node.name}: keys of unknown shape")
        shapes.add((k.shape[1], k.shape[3], k.dtype))
    if len(shapes) != 1:
        raise KernlError(f"generation: layers differ in cache shape ({sorted(map(str, shapes))})")
    heads, dim, dtype = shapes.pop()
    return CacheLayout(len(_attentions(gm.graph)), heads, dim, dtype)


def _placeholders(graph: torch.fx.Graph) -> dict[str, torch.fx.Node]:
    return {n.name: n for n in graph.nodes if n.op == "placeholder"}


def _add_caches(graph: torch.fx.Graph, layers: int) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """k/v cache placeholders of each layer, placed before the user inputs (params: weights, caches, inputs)."""
    first_input = _placeholders(graph)[GENERATION_INPUTS[0]]
    caches = []
    with graph.inserting_before(first_input):
        for i in range(layers):
            caches.append((graph.placeholder(f"cache_k_{i}"), graph.placeholder(f"cache_v_{i}")))
    return caches


def _logits(graph: torch.fx.Graph) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]:
    """(output node, the LM head's kernl.linear, the logits it makes: the head, or with a vocabulary-parallel head
    the all_gather of its slices) when the program's first output is the head's result."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    outs = output.args[0]
    logits = outs[0] if isinstance(outs, (tuple, list)) else outs
    head = logits
    while is_call(head, aten.alias.default, *VIEW_OPS):
        head = head.args[0]
    whole = head
    if is_call(head, kernl_ops.all_gather.default):
        head = head.args[0]
    value = fake(logits)
    if not is_call(head, kernl_ops.linear.default) or value is None or value.dim() != 3:
        raise KernlError("generation: the model's first output is not an LM head's logits [batch, seq, vocab]")
    return output, head, whole


def _set_output(graph: torch.fx.Graph, output: torch.fx.Node, logits: torch.fx.Node) -> None:
    """Return only the logits, as [batch, vocab]."""
    with graph.inserting_before(output):
        flat = graph.call_function(aten.view.default, (logits, [-1, fake(logits).shape[-1]]))
    output.args = ((flat,),)


def _prune(graph: torch.fx.Graph) -> None:
    """Dead-code elimination that keeps the cache writes (they have no users: their effect is the write)."""
    keep = (kernl_ops.cache_fill.default,)
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and not node.users and node.target not in keep:
            graph.erase_node(node)


def prefill_graph(gm: torch.fx.GraphModule, layout: CacheLayout) -> torch.fx.GraphModule:
    gm = copy.deepcopy(gm)
    graph = gm.graph
    attentions = _attentions(graph)
    caches = _add_caches(graph, layout.layers)
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_placeholder):
        rows = graph.placeholder(PREFILL_EXTRA[1])
    with graph.inserting_after(last_placeholder):
        last = graph.placeholder(PREFILL_EXTRA[0])
    for node, (k_cache, v_cache) in zip(attentions, caches, strict=True):
        with graph.inserting_after(node):
            graph.call_function(kernl_ops.cache_fill.default, (k_cache, v_cache, node.args[1], node.args[2], rows))
    output, head, logits = _logits(graph)
    hidden = head.args[0]
    width = fake(hidden).shape[-1]
    with graph.inserting_before(head):
        index = graph.call_function(aten.view.default, (last, [-1, 1, 1]))
        index = graph.call_function(aten.expand.default, (index, [-1, 1, width]))
        picked = graph.call_function(aten.gather.default, (hidden, 1, index))
    head.args = (picked, *head.args[1:])
    _set_output(graph, output, logits)
    _prune(graph)
    graph.lint()
    gm.recompile()
    return gm


def decode_graph(gm: torch.fx.GraphModule, layout: CacheLayout) -> torch.fx.GraphModule:
    gm = copy.deepcopy(gm)
    graph = gm.graph
    attentions = _attentions(graph)
    caches = _add_caches(graph, layout.layers)
    positions_2d = _placeholders(graph)[GENERATION_INPUTS[1]]
    with graph.inserting_after(positions_2d):
        positions = graph.call_function(aten.view.default, (positions_2d, [-1]))
    for node, (k_cache, v_cache) in zip(attentions, caches, strict=True):
        q, k, v = node.args[:3]
        scale = node.args[5] if len(node.args) > 5 else node.kwargs.get("scale")
        with graph.inserting_before(node):
            q3, k3, v3 = (graph.call_function(aten.squeeze.dim, (t, 2)) for t in (q, k, v))
            out = graph.call_function(
                kernl_ops.decode_attention_append.default, (q3, k_cache, v_cache, k3, v3, positions, scale)
            )
            out4 = graph.call_function(aten.unsqueeze.default, (out, 2))
        node.replace_all_uses_with(out4)
        graph.erase_node(node)
    output, _, logits = _logits(graph)
    _set_output(graph, output, logits)
    _prune(graph)
    graph.lint()
    gm.recompile()
    return gm
