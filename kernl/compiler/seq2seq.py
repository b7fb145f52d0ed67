"""An encoder-decoder's two rewritten graphs → the two entries of a seq2seq generation bundle.

The encoder graph E (encoder inputs → hidden states [b, enc, d]) and the decoder graph D (decoder_input_ids,
decoder_position_ids, encoder_hidden_states[, encoder_attention_mask] → logits [b, s, vocab]) come from two
exports of one model, so weights shared by both (tied embeddings) carry one name. Each kernl.attention of D is
a self-attention, or a cross-attention when its keys derive from encoder_hidden_states.

- encode (inputs: the encoder's, then rows [b]): E, then D's cross-attention key/value
  projections of E's output (they depend on nothing else), each written with kernl.cache_fill into that layer's
  cross cache at the request's row. Returns the encoder hidden states (the compile check reads them).
- decode (inputs: decoder_input_ids [n, 1], decoder_position_ids [n, 1], enc_lengths [r]): D where each
  self-attention becomes kernl.decode_attention_append over the self cache (as in the decoder-LM decode step),
  and each cross-attention becomes kernl.decode_attention over the cross cache: the n = r * beams decode rows
  are request-major, so the beams of request i go into the head axis ([r, heads * beams, d]) and read the
  cross cache row i as grouped-query heads. Cross keys and values are never copied per beam, and no row map
  is needed. Each request attends [0, enc_lengths[i]) of its encoder output. Returns logits [n, vocab].
  A self-attention whose mask reads a weight (T5's relative position bias, computed in layer 0 from arange
  and reused by every layer) instead appends the row's k/v with kernl.cache_append, then runs kernl.attention
  over the whole cache with a float mask: the row's line of the mask's own computation replayed once per step
  at the cache's full length ([1, heads, L, L], causal part included), picked by each row's position.

State (program order): self k/v of each decoder layer [rows, heads, max_length, head_dim], then cross k/v
of each layer [requests + 1, heads, enc_max, head_dim] (the extra row takes a padded bucket's writes).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx

from kernl.compiler.passes._fx import fake, is_call
from kernl.errors import KernlError

aten = torch.ops.aten
kernl_ops = torch.ops.kernl

ENCODE, DECODE = "encode", "decode"
DECODER_INPUTS = ("decoder_input_ids", "decoder_position_ids")
ENCODER_STATES = "encoder_hidden_states"
ENCODER_MASK = "encoder_attention_mask"
ENC_LENGTHS, ROWS = "enc_lengths", "rows"


@dataclass(frozen=True)
class Seq2SeqLayout:
    layers: int  # decoder layers (self- and cross-attention each)
    self_heads: int
    cross_heads: int
    head_dim: int
    dtype: torch.dtype

    def state(self, decode_rows: int, max_length: int, requests: int, enc_max: int) -> list[dict]:
        dtype = str(self.dtype).removeprefix("torch.")
        self_shape = [decode_rows, self.self_heads, max_length, self.head_dim]
        cross_shape = [requests + 1, self.cross_heads, enc_max, self.head_dim]
        shapes = {"self": self_shape, "cross": cross_shape}
        return [{"name": name, "dtype": dtype, "shape": shapes[name.split("_")[0]]} for name in self.state_names()]

    def state_names(self) -> list[str]:
        return [f"{side}_{kind}_{i}" for side in ("self", "cross") for i in range(self.layers) for kind in "kv"]


def _placeholders(graph: torch.fx.Graph) -> dict[str, torch.fx.Node]:
    return {n.name: n for n in graph.nodes if n.op == "placeholder"}


def _descendants(source: torch.fx.Node) -> set[torch.fx.Node]:
    """Nodes whose values derive from source's values (not merely from its sizes: sym_size edges are skipped)."""
    seen, todo = set(), [source]
    while todo:
        node = todo.pop()
        for user in node.users:
            if user not in seen and not is_call(user, aten.sym_size.int):
                seen.add(user)
                todo.append(user)
    return seen


def split_attentions(graph: torch.fx.Graph) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
    """(self-attentions, cross-attentions) of the decoder graph, in layer order; KernlError unless every layer
    has one of each and every attention was rewritten onto kernl.attention."""
    inputs = _placeholders(graph)
    if ENCODER_STATES not in inputs or DECODER_INPUTS[0] not in inputs:
        raise KernlError("seq2seq: the decoder graph needs decoder_input_ids and encoder_hidden_states inputs")
    # Cross-attention keys depend on the encoder's states only; a self-attention's on the decoder's tokens
    # (and, past the first layer, on the encoder's too, through the residual stream).
    from_encoder = _descendants(inputs[ENCODER_STATES])
    from_decoder = set().union(*(_descendants(inputs[n]) for n in DECODER_INPUTS if n in inputs))
    nodes = [n for n in graph.nodes if is_call(n, kernl_ops.attention.default)]
    self_nodes = [n for n in nodes if n.args[1] in from_decoder]
    cross_nodes = [n for n in nodes if n.args[1] not in from_decoder and n.args[1] in from_encoder]
    uses = [n for n in graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)]
    if uses or not self_nodes or len(self_nodes) != len(cross_nodes) or len(nodes) != 2 * len(self_nodes):
        raise KernlError(f"seq2seq: the decoder's attentions were not all rewritten onto kernl's kernel "
                         f"({len(self_nodes)} self, {len(cross_nodes)} cross, {len(uses)} left as aten)")  # fmt: skip
    return self_nodes, cross_nodes


def layout(graph: torch.fx.Graph) -> Seq2SeqLayout:
    self_nodes, cross_nodes = split_attentions(graph)
    shapes = set()
    for node in self_nodes + cross_nodes:
        k = fake(node.args[1])
        if k is None or not isinstance(k.shape[1], int) or not isinstance(k.shape[3], int):
            raise KernlError(f"seq2seq: {node.name}: keys of unknown shape")
        shapes.add((node in cross_nodes, k.shape[1], k.shape[3], k.dtype))
    self_shapes = {s[1:] for s in shapes if not s[0]}
    cross_shapes = {s[1:] for s in shapes if s[0]}
    if len(self_shapes) != 1 or len(cross_shapes) != 1:
        raise KernlError(f"seq2seq: layers differ in cache shape ({sorted(map(str, shapes))})")
    (sh, sd, dtype), (ch, cd, _) = self_shapes.pop(), cross_shapes.pop()
    if sd != cd:
        raise KernlError(f"seq2seq: self- and cross-attention head sizes differ ({sd}, {cd})")
    return Seq2SeqLayout(len(self_nodes), sh, ch, sd, dtype)


def _scale(node: torch.fx.Node):
    return node.args[5] if len(node.args) > 5 else node.kwargs.get("scale")


def arrange_params(graph: torch.fx.Graph, names: list[str], metas: dict[str, dict]) -> None:
    """Make the graph's placeholders exactly `names`, in that order (every entry takes every weight and all the
    state): missing ones are added (metadata from metas), unknown ones refused."""
    have = _placeholders(graph)
    extra = sorted(set(have) - set(names))
    if extra:
        raise KernlError(f"seq2seq: an entry has an unexpected input {extra[0]!r}")
    first = next(iter(graph.nodes))
    with graph.inserting_before(first):
        for name in names:
            if name not in have:
                have[name] = graph.placeholder(name)
                have[name].meta.update(metas.get(name, {}))
    previous = None
    for name in names:
        node = have[name]
        if previous is None:
            if node is not next(iter(graph.nodes)):
                next(iter(graph.nodes)).prepend(node)
        else:
            previous.append(node)
        previous = node


def _prune(graph: torch.fx.Graph) -> None:
    keep = (kernl_ops.cache_fill.default, kernl_ops.cache_append.default)
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and not node.users and node.target not in keep:
            graph.erase_node(node)


def _first_output(graph: torch.fx.Graph) -> tuple[torch.fx.Node, torch.fx.Node]:
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    outs = output.args[0]
    return output, (outs[0] if isinstance(outs, (tuple, list)) else outs)


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    """The nodes node's value is computed from, sym_size nodes included but not the tensors they measure."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            if not is_call(n, aten.sym_size.int):
                todo.extend(n.all_input_nodes)
    return seen


def _position_bias(mask, inputs: dict[str, torch.fx.Node]) -> bool:
    """mask (a self-attention's additive mask) reads a weight: a learned position bias (T5's relative bias),
    not a causal/padding mask only (which decode_attention_append's per-row lengths already give)."""
    if not isinstance(mask, torch.fx.Node):
        return False
    decoder = {inputs[n] for n in (*DECODER_INPUTS, ENCODER_STATES, ENCODER_MASK) if n in inputs}
    return any(n.op == "placeholder" and n not in decoder for n in _ancestors(mask))


def _full_length_mask(graph: torch.fx.Graph, mask: torch.fx.Node, inputs: dict[str, torch.fx.Node],
                      length: torch.fx.Node, env: dict) -> torch.fx.Node:  # fmt: skip
    """A copy of mask's computation for one sequence of the cache's full length: [1 | .., heads, L, L], query
    position p's row holding its bias (and causal mask) over key positions 0..L-1. The mask may depend on the
    decoder inputs' sizes only: their batch becomes 1 and their length L. env: original → copy, shared by the
    layers (T5 computes the bias once, in layer 0, and every layer adds it)."""
    decoder = {inputs[n] for n in DECODER_INPUTS if n in inputs}
    others = {inputs[n] for n in (ENCODER_STATES, ENCODER_MASK) if n in inputs}
    needed = _ancestors(mask)
    if needed & (decoder | others):
        bad = sorted(n.name for n in needed & (decoder | others))
        raise KernlError(f"seq2seq: a self-attention's position bias reads the values of {bad}")
    ids = fake(inputs[DECODER_INPUTS[0]])
    for node in list(graph.nodes):
        if node in env:
            continue
        if node not in needed or node.op == "placeholder":
            if node.op == "placeholder":
                env[node] = node
            continue
        if is_call(node, aten.sym_size.int):
            size = fake(node.args[0]).shape[node.args[1]] if fake(node.args[0]) is not None else None
            if ids is not None and str(size) == str(ids.shape[0]):
                env[node] = 1
            elif ids is not None and str(size) == str(ids.shape[1]):
                env[node] = length
            else:
                raise KernlError(f"seq2seq: a self-attention's position bias depends on size {size}")
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    return env[mask]


def _biased_self_attention(graph, node, k_cache, v_cache, positions, full_masks, inputs) -> None:
    """Self-attention with a position bias at decode: append the row's k/v to the cache at its position, then
    kernl.attention over the whole cache with that row's line of the full-length mask (bias, and the causal
    mask past the row's position) as its float mask."""
    q, k, v, mask = node.args[:4]
    if fake(mask) is None or fake(mask).dim() != 4:
        raise KernlError(f"seq2seq: {node.name}: a position bias of rank other than 4 ([batch, heads, q, k])")
    with graph.inserting_before(node):
        if "length" not in full_masks:
            full_masks["length"] = graph.call_function(aten.sym_size.int, (k_cache, 2))
        full = _full_length_mask(graph, mask, inputs, full_masks["length"], full_masks)
        k3, v3 = (graph.call_function(aten.squeeze.dim, (t, 2)) for t in (k, v))
        graph.call_function(kernl_ops.cache_append.default, (k_cache, v_cache, k3, v3, positions))
        rows = graph.call_function(aten.sym_size.int, (q, 0))
        keys, values = (graph.call_function(aten.slice.Tensor, (c, 0, 0, rows)) for c in (k_cache, v_cache))
        # [1, h, L, L] → the lines of each row's position [1, h, n, L] → [n, h, 1, L]
        lines = graph.call_function(aten.index_select.default, (full, 2, positions))
        lines = graph.call_function(aten.permute.default, (lines, [2, 1, 0, 3]))
        out = graph.call_function(kernl_ops.attention.default, (q, keys, values, lines, False, _scale(node)))
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def decode_graph(decoder: torch.fx.GraphModule, lay: Seq2SeqLayout, vocab: int) -> torch.fx.GraphModule:
    gm = copy.deepcopy(decoder)
    graph = gm.graph
    self_nodes, cross_nodes = split_attentions(graph)
    inputs = _placeholders(graph)
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        enc_lengths = graph.placeholder(ENC_LENGTHS)
    with graph.inserting_before(inputs[DECODER_INPUTS[0]]):
        state = {name: graph.placeholder(name) for name in lay.state_names()}
    with graph.inserting_after(inputs[DECODER_INPUTS[1]]):
        positions = graph.call_function(aten.view.default, (inputs[DECODER_INPUTS[1]], [-1]))
    full_masks: dict = {}  # the full-length mask's copied nodes, shared by the layers
    for i, node in enumerate(self_nodes):
        q, k, v = node.args[:3]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("mask")
        if _position_bias(mask, inputs):
            _biased_self_attention(graph, node, state[f"self_k_{i}"], state[f"self_v_{i}"], positions,
                                   full_masks, inputs)  # fmt: skip
            continue
        with graph.inserting_before(node):
            q3, k3, v3 = (graph.call_function(aten.squeeze.dim, (t, 2)) for t in (q, k, v))
            out = graph.call_function(
                kernl_ops.decode_attention_append.default,
                (q3, state[f"self_k_{i}"], state[f"self_v_{i}"], k3, v3, positions, _scale(node)),
            )
            out4 = graph.call_function(aten.unsqueeze.default, (out, 2))
        node.replace_all_uses_with(out4)
        graph.erase_node(node)
    heads, dim = lay.cross_heads, lay.head_dim
    for i, node in enumerate(cross_nodes):
        q = node.args[0]
        if fake(q) is not None and fake(q).shape[1] != heads:
            raise KernlError(f"seq2seq: {node.name}: {fake(q).shape[1]} query heads for {heads} kv heads")
        with graph.inserting_before(node):
            requests = graph.call_function(aten.sym_size.int, (enc_lengths, 0))
            # [n, h, 1, d] → [r, beams, h, d] → [r, h, beams, d] → [r, h * beams, d]: q head h*beams + b reads
            # kv head h of the request's cross cache row.
            grouped = graph.call_function(aten.view.default, (q, [requests, -1, heads, dim]))
            grouped = graph.call_function(aten.permute.default, (grouped, [0, 2, 1, 3]))
            grouped = graph.call_function(aten.reshape.default, (grouped, [requests, -1, dim]))
            out = graph.call_function(
                kernl_ops.decode_attention.default,
                (grouped, state[f"cross_k_{i}"], state[f"cross_v_{i}"], enc_lengths, _scale(node)),
            )
            out = graph.call_function(aten.view.default, (out, [requests, heads, -1, dim]))
            out = graph.call_function(aten.permute.default, (out, [0, 2, 1, 3]))
            out = graph.call_function(aten.reshape.default, (out, [-1, heads, 1, dim]))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    output, logits = _first_output(graph)
    with graph.inserting_before(output):
        flat = graph.call_function(aten.reshape.default, (logits, [-1, vocab]))
    output.args = ((flat,),)
    _prune(graph)
    copies = {n for n in full_masks.values() if isinstance(n, torch.fx.Node)}
    ranges = [n for n in graph.nodes if n not in copies and n.op == "call_function" and "arange" in str(n.target)]
    if ranges:  # e.g. rotary positions from arange(seq): at one token a step, every row would sit at position 0
        raise KernlError(f"seq2seq: the decoder computes positions inside the model ({ranges[0].name}), not from "
                         "decoder_position_ids, a position table or its self-attention's bias")  # fmt: skip
    for name in (ENCODER_STATES, ENCODER_MASK):
        node = _placeholders(graph).get(name)
        if node is not None:
            if node.users:
                raise KernlError(f"seq2seq: the decoder reads {name} outside its cross-attentions ({list(node.users)})")
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def _batch_of_decoder(node: torch.fx.Node) -> bool:
    """node is sym_size(a decoder input, 0)."""
    return (
        is_call(node, aten.sym_size.int)
        and node.args[1] == 0
        and getattr(node.args[0], "op", None) == "placeholder"
        and node.args[0].name in DECODER_INPUTS
    )


def encode_graph(
    encoder: torch.fx.GraphModule, decoder: torch.fx.GraphModule, lay: Seq2SeqLayout, encoder_inputs: list[str]
) -> torch.fx.GraphModule:
    """E followed by D's cross key/value projections of its output and their cache_fill at `rows`;
    encoder_inputs: E's user inputs (its other placeholders are weights)."""
    gm = copy.deepcopy(encoder)
    graph = gm.graph
    _, cross_nodes = split_attentions(decoder.graph)
    output, hidden = _first_output(graph)
    inputs = _placeholders(graph)
    user_first = inputs[encoder_inputs[0]]
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        rows = graph.placeholder(ROWS)
    with graph.inserting_before(user_first):
        state = {name: graph.placeholder(name) for name in lay.state_names()}
    # The decoder nodes the cross keys and values need: encoder_hidden_states, weights, and what they compute.
    wanted: set[torch.fx.Node] = set()
    todo = [a for node in cross_nodes for a in node.args[1:3]]
    while todo:
        node = todo.pop()
        if node in wanted:
            continue
        wanted.add(node)
        if not _batch_of_decoder(node):
            todo.extend(node.all_input_nodes)
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    with graph.inserting_before(output):
        for node in decoder.graph.nodes:
            if node not in wanted:
                continue
            if _batch_of_decoder(node):  # the decoder's batch is the encoder's
                env[node] = graph.call_function(aten.sym_size.int, (hidden, 0))
                continue
            if node.op == "placeholder":
                if node.name == ENCODER_STATES:
                    env[node] = hidden
                elif node.name in inputs:
                    env[node] = inputs[node.name]
                elif node.name in DECODER_INPUTS or node.name == ENCODER_MASK:
                    raise KernlError(f"seq2seq: cross-attention keys depend on the decoder input {node.name}")
                else:  # a weight only the decoder reads: a new parameter, placed by arrange_params
                    with graph.inserting_before(user_first):
                        env[node] = graph.placeholder(node.name)
                    env[node].meta.update(node.meta)
                continue
            env[node] = graph.node_copy(node, lambda n: env[n])
        for i, node in enumerate(cross_nodes):
            k, v = env[node.args[1]], env[node.args[2]]
            graph.call_function(
                kernl_ops.cache_fill.default, (state[f"cross_k_{i}"], state[f"cross_v_{i}"], k, v, rows)
            )
    output.args = ((hidden,),)
    _prune(graph)
    graph.lint()
    gm.recompile()
    return gm
