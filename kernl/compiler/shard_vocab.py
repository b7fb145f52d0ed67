"""Vocabulary-parallel embedding and LM head, where the table is large enough that reading it whole on every rank
costs more than a collective.

At decode batch 1 a step is a read of the weights: a Llama-3 LM head (128256 x 4096 bf16, 1 GB) read whole by
every rank costs as much as four of its layers. Split by vocabulary rows, rank r holds rows [r * V/N, (r+1) * V/N):

- LM head: each rank computes its slice of the logits, and kernl.all_gather puts the slices side by side.
- Embedding (the table input_ids index): each rank looks up the ids in its rows (ids outside them read row 0 and
  are zeroed), and kernl.all_reduce sums the ranks' rows: exactly one rank contributes each id's row. Only a
  table the LM head also reads (tied) is split this way: a lookup reads one row a token, so splitting a table of
  its own saves memory alone, and costs a decode step an all-reduce and five masking kernels
  (SPLIT_UNTIED_EMBEDDING).

The program stays one for all ranks: a rank's first row is a weight of its own (the "vocab start", [1] int64).
A table tied to the LM head is split for both or neither. Tables under VOCAB_PARALLEL_MIN_BYTES stay whole.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx

from kernl.compiler.passes._fx import VIEW_OPS, fake, infer_val, is_call

aten = torch.ops.aten
kernl_ops = torch.ops.kernl

# A table of at least this many bytes is split (a GPT-2 head, 77 MB in fp16, is; a 1-layer test model's is not).
VOCAB_PARALLEL_MIN_BYTES = 32 * 2**20
# Whether an embedding that no LM head reads is split as well (for tests and A/B benchmarks of the lookup path).
SPLIT_UNTIED_EMBEDDING = False


def _weight_of(node, weights: Mapping) -> torch.fx.Node | None:
    ok = isinstance(node, torch.fx.Node) and node.op == "placeholder" and node.name in weights
    return node if ok else None


def _lm_heads(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The kernl.linear (no bias, activation or residual) whose output is the program's first output."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    outs = output.args[0]
    node = outs[0] if isinstance(outs, (tuple, list)) else outs
    while is_call(node, aten.alias.default, *VIEW_OPS):
        node = node.args[0]
    if not is_call(node, kernl_ops.linear.default) or any(a is not None for a in node.args[2:5]):
        return []
    return [node]


def _is_input_ids(node) -> bool:
    """The program's input_ids, directly or through views (GPT-2 reads input_ids.view(-1, seq))."""
    while is_call(node, aten.alias.default, *VIEW_OPS):
        node = node.args[0]
    return isinstance(node, torch.fx.Node) and node.op == "placeholder" and node.name == "input_ids"


def _tables(graph: torch.fx.Graph, weights: Mapping) -> list[torch.fx.Node]:
    """aten.embedding lookups of the program's input_ids."""
    found = [n for n in graph.nodes if is_call(n, aten.embedding.default)]
    return [n for n in found if _weight_of(n.args[0], weights) is not None and _is_input_ids(n.args[1])]


def _split_dim(user: torch.fx.Node, weight: torch.fx.Node) -> int | None:
    """The weight's vocabulary dim as user reads it."""
    if is_call(user, aten.embedding.default) and user.args[0] is weight:
        return 0
    if is_call(user, kernl_ops.linear.default) and user.args[1] is weight:
        return 1 if user.args[5] else 0
    return None


def _offset_placeholder(graph: torch.fx.Graph, name: str, ids: torch.fx.Node) -> torch.fx.Node:
    """A [1] int64 weight input, beside the other weights (placed as PassContext.add_weight places them)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[0]):
        node = graph.placeholder(name)
    val = fake(ids)
    if hasattr(val, "fake_mode"):
        with val.fake_mode:
            node.meta["val"] = torch.zeros(1, dtype=torch.int64, device=val.device)
    return node


def _lookup(graph: torch.fx.Graph, emb: torch.fx.Node, start: torch.fx.Node, rows: int) -> list[torch.fx.Node]:
    """emb(table, ids) → all_reduce(emb(rank's rows, ids - start), zero where ids fall outside them)."""
    ids = emb.args[1]
    users = list(emb.users)
    with graph.inserting_before(emb):
        local = graph.call_function(aten.sub.Tensor, (ids, start))
        below = graph.call_function(aten.lt.Scalar, (local, 0))
        above = graph.call_function(aten.ge.Scalar, (local, rows))
        outside = graph.call_function(aten.bitwise_or.Tensor, (below, above))
        safe = graph.call_function(aten.masked_fill.Scalar, (local, outside, 0))
    emb.update_arg(1, safe)
    with graph.inserting_after(emb):
        mask = graph.call_function(aten.unsqueeze.default, (outside, -1))
    with graph.inserting_after(mask):
        zeroed = graph.call_function(aten.masked_fill.Scalar, (emb, mask, 0))
    with graph.inserting_after(zeroed):
        total = graph.call_function(kernl_ops.all_reduce.default, (zeroed,))
    for node in (local, below, above, outside, safe, mask, zeroed, total):
        node.meta.update({k: v for k, v in emb.meta.items() if k not in ("val", "tensor_meta")})
    for user in users:
        user.replace_input_with(emb, total)
    return [local, below, above, outside, safe, emb, mask, zeroed, total]


def _gather(graph: torch.fx.Graph, head: torch.fx.Node, world_size: int) -> list[torch.fx.Node]:
    users = list(head.users)
    with graph.inserting_after(head):
        gathered = graph.call_function(kernl_ops.all_gather.default, (head, world_size))
    gathered.meta.update({k: v for k, v in head.meta.items() if k not in ("val", "tensor_meta")})
    for user in users:
        user.replace_input_with(head, gathered)
    return [head, gathered]


def split_vocab(
    graph: torch.fx.Graph, weights: Mapping[str, torch.Tensor], world_size: int, min_bytes: int
) -> tuple[dict[str, int], dict[str, int], list[torch.fx.Node], dict]:
    """Rewrite the LM head and the input_ids embedding to vocabulary-parallel where their table qualifies.

    Returns (split weights: name -> vocab dim, offset weights: name -> rows per rank, the nodes whose fake values
    must be recomputed once the weights' are, the plan's JSON entry).
    """
    heads, tables = _lm_heads(graph), _tables(graph, weights)
    by_weight: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in [*heads, *tables]:
        w = node.args[1] if node in heads else node.args[0]
        if _weight_of(w, weights) is not None:
            by_weight.setdefault(w, []).append(node)
    split: dict[str, int] = {}
    offsets: dict[str, int] = {}
    changed: list[torch.fx.Node] = []
    entry = {"min_bytes": min_bytes, "embedding": [], "lm_head": []}
    for i, (weight, users) in enumerate(by_weight.items()):
        val = fake(weight)
        dims = {_split_dim(u, weight) for u in weight.users}
        if val is None or len(dims) != 1 or None in dims or set(weight.users) != set(users):
            continue  # read by other ops too, or by the head transposed and the embedding not: stays whole
        (dim,) = dims
        vocab = val.shape[dim]
        if not isinstance(vocab, int) or vocab % world_size or val.numel() * val.element_size() < min_bytes:
            continue
        if not SPLIT_UNTIED_EMBEDDING and not any(u in heads for u in users):
            continue  # an embedding alone: the whole table, read one row a token, beats a sum over ranks
        split[weight.name] = dim
        for user in users:
            if user in heads:
                changed += _gather(graph, user, world_size)
                entry["lm_head"].append(weight.name)
            else:
                start = _offset_placeholder(graph, f"tp_vocab_start_{i}", user.args[1])
                offsets[start.name] = vocab // world_size
                changed += _lookup(graph, user, start, vocab // world_size)
                entry["embedding"].append(weight.name)
    return split, offsets, changed, entry


def refresh(nodes: list[torch.fx.Node]) -> None:
    """Recompute the fake values of nodes (in graph order) after their weights' changed."""
    for node in nodes:
        infer_val(node)
