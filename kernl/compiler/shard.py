"""Tensor parallelism decided on the rewritten graph: Megatron's column- and row-parallel linears.

A linear whose output only flows, through reshapes, rotary and attention (or an activation), into another
linear's input is column-parallel: each rank computes a slice of its output features (a slice of the Q, K
and V heads, or of the MLP's intermediate features). The linear reading that slice is row-parallel: each
rank multiplies its slice by the matching rows of the weight, and one all-reduce sums the ranks' partial
outputs. Attention heads (query and key/value heads alike) are split across ranks, so every reshape
between the projections and attention gets the per-rank head count: a constant, the same on every rank.
So the ranks share one program; only their weights differ. Norms are replicated; a large embedding and LM
head are split by vocabulary (kernl.compiler.shard_vocab), smaller ones replicated.

What matches is found from the graph's data flow, not from module names: a candidate linear whose output
reaches an op this pass cannot split (a residual add, the program's output) stays whole. What cannot be
split evenly (heads or features not divisible by the world size) raises a KernlError.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.fx

from kernl.compiler import shard_vocab
from kernl.compiler.passes._fx import VIEW_OPS, fake, infer_val, same_size
from kernl.compiler.shard_dims import (
    POINTWISE,
    SINGLE_INPUT,
    Edit,
    Requirement,
    Shard,
    Unshardable,
    getitem,
    pointwise,
)
from kernl.compiler.shard_norm import fuse_linears_into_sums, fuse_sums_into_norms
from kernl.errors import KernlError
from kernl.kernels import collectives as _collectives  # noqa: F401 - declares torch.ops.kernl.all_reduce
from kernl.kernels import register_ops

register_ops()  # the pass writes torch.ops.kernl.all_reduce into the graph

aten = torch.ops.aten
kernl_ops = torch.ops.kernl


@dataclass(frozen=True)
class Split:
    """A weight split across ranks: rank r holds the r-th of world_size equal parts of each block of dim."""

    dim: int
    segments: tuple[int, ...]


@dataclass(frozen=True)
class Scaled:
    """A weight every rank holds divided by the world size: a row-parallel bias, summed back by the all-reduce."""


@dataclass(frozen=True)
class Offset:
    """A per-rank constant: rank r holds [r * rows] (where its slice of a vocabulary-parallel table starts)."""

    rows: int


@dataclass
class ShardPlan:
    """How the (shared) sharded program's weights are made for each rank, from the unsharded ones."""

    world_size: int
    rules: dict[str, Split | Scaled | Offset] = field(default_factory=dict)  # weights absent here are replicated
    report: dict[str, int] = field(default_factory=dict)
    vocab: dict = field(default_factory=dict)  # the vocabulary-parallel decision (kernl.compiler.shard_vocab)

    def shard(self, name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank rank's part of weight name (a contiguous tensor; a replicated weight is returned as it is)."""
        if not 0 <= rank < self.world_size:
            raise KernlError(f"rank {rank}: expected 0..{self.world_size - 1}")
        rule = self.rules.get(name)
        if rule is None:
            return tensor
        with torch.no_grad():
            if isinstance(rule, Offset):
                return torch.full((1,), rank * rule.rows, dtype=torch.int64, device=tensor.device)
            if isinstance(rule, Scaled):
                return tensor / self.world_size
            parts, start = [], 0
            for size in rule.segments:
                chunk = size // self.world_size
                parts.append(tensor.narrow(rule.dim, start + rank * chunk, chunk))
                start += size
            return (parts[0] if len(parts) == 1 else torch.cat(parts, rule.dim)).contiguous()

    def weights_for(self, weights: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
        """Every weight of the program as rank rank holds it, by placeholder name."""
        return {name: self.shard(name, tensor, rank) for name, tensor in weights.items()}

    def id_limit(self) -> int | None:
        """Rows of the whole vocabulary-parallel embedding (each rank holds an equal part), which token ids must
        stay below; None when no embedding is split. The program reads ids through a shift and a mask, so the
        runtime cannot find this table itself: the manifest declares it."""
        rows = [r.rows for r in self.rules.values() if isinstance(r, Offset)]
        return min(rows) * self.world_size if rows else None

    def describe(self) -> dict:
        """JSON for a manifest: the world size and how each split weight was split."""
        split = {
            name: {"dim": r.dim, "blocks": list(r.segments)} for name, r in self.rules.items() if isinstance(r, Split)
        }
        scaled = sorted(name for name, r in self.rules.items() if isinstance(r, Scaled))
        out = {"world_size": self.world_size, "split": split, "scaled": scaled}
        if self.vocab:
            offsets = {name: r.rows for name, r in self.rules.items() if isinstance(r, Offset)}
            out["vocab_parallel"] = {**self.vocab, "offsets": offsets}
        return out


def _placeholder(node, weights: Mapping) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "placeholder" and node.name in weights


def _arg(node: torch.fx.Node, index: int):
    return node.args[index] if len(node.args) > index else None


class _Propagation:
    """One pass over the graph describing every split value, for a given set of column-parallel candidates."""

    def __init__(self, graph: torch.fx.Graph, weights: Mapping, columns: set, cuts: dict) -> None:
        self.graph, self.weights, self.columns, self.cuts = graph, weights, columns, cuts
        self.shards: dict[torch.fx.Node, object] = {}
        self.edits: list[Edit] = []
        self.needs: list[Requirement] = []
        self.rows: list[torch.fx.Node] = []

    def run(self) -> None:
        """Raises _Conflict(roots, reason) at the first op that cannot take a split value."""
        for node in self.graph.nodes:
            split_inputs = [a for a in node.all_input_nodes if self.shards.get(a) is not None]
            if node.op == "call_function" and node in self.columns and not split_inputs:
                self.shards[node] = self._column(node)
            elif split_inputs:
                try:
                    self.shards[node] = self._through(node)
                except Unshardable as err:
                    roots = frozenset().union(*(self._roots(self.shards[a]) for a in split_inputs))
                    raise _Conflict(roots, str(err)) from None

    @staticmethod
    def _roots(value) -> frozenset:
        if isinstance(value, Shard):
            return value.roots
        return frozenset().union(*(v.roots for v in value if v is not None))

    def _single_use_weights(self, node: torch.fx.Node, names: list) -> None:
        for w in names:
            if w is not None and (not _placeholder(w, self.weights) or len(w.users) != 1):
                raise Unshardable(f"{node.name}: {getattr(w, 'name', w)} is not a weight read by this linear only")

    def _column(self, node: torch.fx.Node) -> Shard:
        out = fake(node)
        segments = self.cuts[node]
        fused = " (one block of a fused projection)" if len(segments) > 1 else ""
        for size in segments:
            self.needs.append(Requirement(size, f"{node.name}: {size} output features{fused}"))
        return Shard(out.dim() - 1, segments, frozenset([node]))

    def _through(self, node: torch.fx.Node):
        if node.op != "call_function":
            raise Unshardable(f"a value split across ranks reaches the program's {node.op}")
        if node.target is kernl_ops.linear.default:
            return self._row(node)
        if node.target is kernl_ops.attention.default:
            return self._attention(node)
        if node.target is kernl_ops.rotary.default:
            q, k, cos, sin = node.args[:4]
            if any(self.shards.get(t) is not None for t in (cos, sin)):
                raise Unshardable(f"{node.name}: rotary's cos/sin are split")
            return (self._heads(node, q, "q"), self._heads(node, k, "k"))
        if node.target in POINTWISE:
            return pointwise(node, self.shards)
        if node.target is aten.sym_size.int:
            src = self.shards[node.args[0]]
            if node.args[1] % fake(node.args[0]).dim() == src.dim:
                raise Unshardable(f"{node.name}: reads the size of the split dim")
            return None
        if node.target is operator.getitem:
            return getitem(node, self.shards)
        rule = SINGLE_INPUT.get(node.target)
        first = node.args[0] if node.args else None
        others = [a for a in node.all_input_nodes if a is not first and self.shards.get(a) is not None]
        if rule is None or others or self.shards.get(first) is None:
            raise Unshardable(f"{node.name}: {node.target} cannot take a value split across ranks")
        out, edit = rule(node, self.shards[first], self.needs)
        if edit is not None:
            self.edits.append(edit)
        return out

    def _heads(self, node: torch.fx.Node, x, name: str) -> Shard:
        shard = self.shards.get(x)
        if not isinstance(shard, Shard) or shard.dim != 1 or len(shard.segments) != 1:
            raise Unshardable(f"{node.name}: {name} is not split by heads ([batch, heads, seq, head_dim])")
        return shard

    def _attention(self, node: torch.fx.Node) -> Shard:
        q, k, v, mask = node.args[:4]
        shards = [self._heads(node, t, name) for t, name in ((q, "q"), (k, "k"), (v, "v"))]
        if mask is not None:
            mv = fake(mask)
            if self.shards.get(mask) is not None or mv is None or (mv.dim() >= 3 and mv.shape[-3] != 1):
                raise Unshardable(f"{node.name}: its mask differs per head (a per-head bias cannot be split yet)")
        heads_q, heads_kv = shards[0].size, shards[1].size
        both = f"{node.name}: {heads_q} query heads and {heads_kv} key/value heads"
        self.needs.insert(0, Requirement(heads_kv, both))
        self.needs.insert(0, Requirement(heads_q, f"{node.name}: {heads_q} query heads"))
        return Shard(1, shards[0].segments, frozenset().union(*(s.roots for s in shards)))

    def _row(self, node: torch.fx.Node) -> None:
        x, weight, bias, activation, residual, transposed = node.args[:6]
        src = self.shards.get(x)
        if not isinstance(src, Shard) or src.dim != fake(x).dim() - 1:
            raise Unshardable(f"{node.name}: reads a value split along another dim than its features")
        if any(self.shards.get(a) is not None for a in (weight, bias, residual)):
            raise Unshardable(f"{node.name}: a split value as its weight, bias or residual")
        if activation is not None:
            raise Unshardable(f"{node.name}: an activation after a row-parallel linear needs the whole sum")
        self._single_use_weights(node, [weight, bias])
        self.rows.append(node)
        return None


class _Conflict(Exception):
    def __init__(self, roots: frozenset, reason: str) -> None:
        super().__init__(reason)
        self.roots, self.reason = roots, reason


def _candidates(graph: torch.fx.Graph, weights: Mapping) -> set:
    """Linears (and gated linears) of weights that could be column-parallel."""
    found = set()
    for node in graph.nodes:
        if node.target is kernl_ops.gated_linear.default:
            names = node.args[1:3]
        elif node.target is kernl_ops.linear.default and _arg(node, 4) is None:  # a residual needs the whole output
            names = [node.args[1], _arg(node, 2)]
        else:
            continue
        if all(w is None or (_placeholder(w, weights) and len(w.users) == 1) for w in names):
            found.add(node)
    return found


_SAME_FEATURES = {aten.alias.default, aten.clone.default, aten.contiguous.default, aten.to.dtype}


def _cuts(node: torch.fx.Node) -> tuple[int, ...]:
    """The blocks of a linear's output features: where slices and splits of them (Q | K | V) cut."""
    full = fake(node).shape[-1]
    edges = {0, full}
    stack = [(node, 0)]  # (a value whose last dim is a run of the output features, where that run starts)
    while stack:
        value, offset = stack.pop()
        val = fake(value)
        if val is None:
            continue
        last, ndim = val.shape[-1], val.dim()
        for user in value.users:
            out = fake(user)
            if user.target in _SAME_FEATURES or (
                user.target in VIEW_OPS and out is not None and same_size(out.shape[-1], last)
            ):
                stack.append((user, offset))
            elif user.target is aten.slice.Tensor and user.args[1] % ndim == ndim - 1:
                start = user.args[2] if len(user.args) > 2 and user.args[2] is not None else 0
                end = user.args[3] if len(user.args) > 3 and user.args[3] is not None else last
                if isinstance(start, int) and isinstance(end, int) and 0 <= start <= end:
                    end = min(end, last)
                    edges.update((offset + start, offset + end))
                    stack.append((user, offset + start))
            elif user.target in (aten.split.Tensor, aten.split_with_sizes.default) and (
                (user.args[2] if len(user.args) > 2 else 0) % ndim == ndim - 1
            ):
                sizes = user.args[1]
                if isinstance(sizes, int):
                    sizes = [min(sizes, last - a) for a in range(0, last, sizes)]
                start = offset
                for size in sizes:
                    edges.add(start + size)
                    start += size
                for piece in user.users:
                    if piece.args[0] is user:  # getitem(split, i)
                        stack.append((piece, offset + sum(sizes[: piece.args[1]])))
    edges = sorted(e for e in edges if isinstance(e, int) and 0 <= e <= full)
    return tuple(b - a for a, b in zip(edges, edges[1:]))


def _decide(graph: torch.fx.Graph, weights: Mapping) -> tuple[_Propagation, dict[torch.fx.Node, str]]:
    """Drop candidates until every split value flows only into ops that take it; returns the final propagation and
    why each dropped candidate was dropped."""
    columns = _candidates(graph, weights)
    cuts = {node: _cuts(node) for node in columns}
    dropped: dict[torch.fx.Node, str] = {}
    while True:
        prop = _Propagation(graph, weights, columns, cuts)
        try:
            prop.run()
        except _Conflict as conflict:
            if not conflict.roots or not conflict.roots <= columns:  # a bug, not a model: never loop
                raise KernlError(f"tensor parallel: {conflict.reason}") from None
            for root in conflict.roots:
                dropped[root] = conflict.reason
            columns = columns - conflict.roots
            continue
        # A candidate left split but never summed back (no row-parallel linear after it) stays whole too.
        return prop, dropped


def _reason_for(node: torch.fx.Node, dropped: dict) -> str:
    """Why an attention was left whole: the reason its nearest dropped projection gave."""
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in dropped:
            return dropped[n]
        stack.extend(n.all_input_nodes)
    return "its q, k and v do not come from projections of the weights"


def _is_attention(node: torch.fx.Node) -> bool:
    """kernl's attention ops (prefill, and the decode steps' cache ops, which are not split yet)."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "kernl" and "attention" in str(target)


def _check(graph: torch.fx.Graph, prop: _Propagation, dropped: dict, world_size: int) -> None:
    for node in graph.nodes:
        if node.target is aten.scaled_dot_product_attention.default:
            raise KernlError(
                f"tensor parallel: {node.name} is an attention kernl did not rewrite; only kernl.attention is split"
            )
        if _is_attention(node) and prop.shards.get(node) is None:
            raise KernlError(f"tensor parallel: cannot split attention {node.name}: {_reason_for(node, dropped)}")
    for need in prop.needs:
        if need.size % world_size:
            raise KernlError(f"tensor parallel: {need.message} do not split evenly over {world_size} ranks")
    if not prop.rows:
        raise KernlError("tensor parallel: found no column-/row-parallel linear pair to split")


def _weight_rules(prop: _Propagation) -> dict[str, Split | Scaled]:
    rules: dict[str, Split | Scaled] = {}
    for node, shard in prop.shards.items():
        if not isinstance(shard, Shard):
            continue
        if node.target is kernl_ops.gated_linear.default and node in prop.columns:
            for w in node.args[1:3]:
                rules[w.name] = Split(0, shard.segments)
        elif node.target is kernl_ops.linear.default and node in prop.columns:
            weight, bias, transposed = node.args[1], _arg(node, 2), node.args[5]
            rules[weight.name] = Split(1 if transposed else 0, shard.segments)
            if bias is not None:
                rules[bias.name] = Split(0, shard.segments)
    for node in prop.rows:
        x, weight, bias, transposed = node.args[0], node.args[1], node.args[2], node.args[5]
        rules[weight.name] = Split(0 if transposed else 1, prop.shards[x].segments)
        if bias is not None:
            rules[bias.name] = Scaled()
    return rules


def _sum_partials(graph: torch.fx.Graph, row: torch.fx.Node) -> None:
    """row's output → all_reduce(row) (+ its residual, added once, after the sum)."""
    residual = row.args[4]
    users = list(row.users)
    row.update_arg(4, None)
    with graph.inserting_after(row):
        total = graph.call_function(kernl_ops.all_reduce.default, (row,))
    total.meta.update({k: v for k, v in row.meta.items() if k != "val"})
    last = total
    if residual is not None:
        with graph.inserting_after(total):
            last = graph.call_function(aten.add.Tensor, (total, residual))
        last.meta.update(total.meta)
    for user in users:
        user.replace_input_with(row, last)


def _split_vocab(graph: torch.fx.Graph, weights: Mapping[str, torch.Tensor], plan: ShardPlan) -> list:
    """The vocabulary-parallel LM head and embedding (shard_vocab), their rules added to plan; returns the nodes
    whose fake values change."""
    split, offsets, nodes, plan.vocab = shard_vocab.split_vocab(
        graph, weights, plan.world_size, shard_vocab.VOCAB_PARALLEL_MIN_BYTES
    )
    for name, dim in split.items():
        plan.rules[name] = Split(dim, (fake(next(n for n in graph.nodes if n.name == name)).shape[dim],))
    for name, rows in offsets.items():
        plan.rules[name] = Offset(rows)
        if hasattr(weights, "add"):  # LazyWeights (a model on meta): made when its file is written
            weights.add(name, torch.zeros(1, dtype=torch.int64))
        else:  # beside the other weights, on their device; each rank's own value comes from ShardPlan.shard
            device = next(iter(weights.values())).device
            weights[name] = torch.zeros(1, dtype=torch.int64, device=device)
    return nodes


def shard_program(gm: torch.fx.GraphModule, weights: Mapping[str, torch.Tensor], world_size: int) -> ShardPlan:
    """Rewrite gm (after run_passes) into the program every rank of world_size runs; returns how each rank's
    weights are made from weights (placeholder name -> unsharded tensor, left as it is).

    Raises KernlError when an attention cannot be split, or heads or features do not divide by world_size.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise KernlError(f"tensor parallel: world size {world_size!r}, expected a positive int")
    if world_size == 1:
        return ShardPlan(1)
    graph = gm.graph
    prop, dropped = _decide(graph, weights)
    _check(graph, prop, dropped, world_size)
    plan = ShardPlan(world_size, _weight_rules(prop))

    # Rewrite: per-rank size constants, the row-parallel sums, then the fake values of everything split.
    for edit in prop.edits:
        edit(world_size)
    for row in prop.rows:
        _sum_partials(graph, row)
    vocab_nodes = _split_vocab(graph, weights, plan)
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    for name, rule in plan.rules.items():
        node, val = placeholders[name], placeholders[name].meta.get("val")
        if isinstance(rule, Split) and hasattr(val, "fake_mode"):
            shape = list(val.shape)
            shape[rule.dim] //= world_size
            with val.fake_mode:
                node.meta["val"] = torch.empty(shape, dtype=val.dtype, device=val.device)
    changed = set(prop.shards) | set(prop.rows) | set(vocab_nodes)
    for node in graph.nodes:
        if (
            node in changed
            or node.target is kernl_ops.all_reduce.default
            or any(u.target is kernl_ops.all_reduce.default for u in node.all_input_nodes)
        ):
            infer_val(node)
    fused_norms = fuse_sums_into_norms(graph)
    fused_linears = fuse_linears_into_sums(graph)
    graph.lint()
    gm.recompile()

    report: Counter[str] = Counter()
    report["tp_column_parallel"] = sum(1 for n in prop.columns if prop.shards.get(n) is not None)
    report["tp_row_parallel"] = len(prop.rows)
    report["tp_all_reduce"] = len(prop.rows) + len(plan.vocab["embedding"])
    report["tp_all_reduce_in_norm"] = fused_norms
    report["tp_linear_in_norm"] = fused_linears
    report["tp_attention"] = sum(1 for n in prop.shards if n.target is kernl_ops.attention.default)
    report["tp_vocab_embedding"] = len(plan.vocab["embedding"])
    report["tp_vocab_lm_head"] = len(plan.vocab["lm_head"])
    plan.report = dict(sorted(report.items()))
    return plan
