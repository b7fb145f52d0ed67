"""In-place aten ops on temporaries become functional (T5's `relative_buckets += ...` exported as aten.add_, which
the runtime's allow-list refuses); a mutation anything else can observe stays."""

import torch
import torch.fx

from kernl.compiler.passes.context import PassContext
from kernl.compiler.passes.inplace import functionalize_inplace

aten = torch.ops.aten


def _graph(mutated: str, *, read_again: bool = False):
    g = torch.fx.Graph()
    x = g.placeholder("x")
    base = {
        "temporary": lambda: g.call_function(aten.mul.Tensor, (x, 2)),
        "input": lambda: x,
        "view": lambda: g.call_function(aten.view.default, (g.call_function(aten.mul.Tensor, (x, 2)), [-1])),
    }[mutated]()
    other = x if mutated != "view" else g.call_function(aten.view.default, (x, [-1]))
    node = g.call_function(aten.add_.Tensor, (base, other))
    g.output((node, base) if read_again else node)
    return g, node


def _run(graph: torch.fx.Graph, x: torch.Tensor):
    return torch.fx.GraphModule(torch.nn.Module(), graph)(x.clone())


def test_temporary_becomes_functional():
    graph, node = _graph("temporary")
    x = torch.randn(3, 4)
    want = _run(graph, x)
    report = functionalize_inplace(PassContext(graph, {}))
    assert report["inplace_functionalized"] == 1 and node.target is aten.add.Tensor
    torch.testing.assert_close(_run(graph, x), want)


def test_observable_mutations_stay():
    for mutated, read_again in (("input", False), ("view", False), ("temporary", True)):
        graph, node = _graph(mutated, read_again=read_again)
        assert not functionalize_inplace(PassContext(graph, {})), mutated
        assert node.target is aten.add_.Tensor
