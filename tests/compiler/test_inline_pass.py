"""The inline pass: no-grad (and autocast-off) regions export wraps in higher-order ops become plain nodes."""

import torch

from tests.compiler.rewrite_utils import max_diff, rewrite_module


def test_llama_rotary_region_is_inlined(families):
    family = families("llama")
    program = family.program
    assert program.rewrites["inlined_region"] == 1  # the rotary embedding, computed once for every layer
    assert not [n for n in program.gm.graph.nodes if n.op == "get_attr"]
    assert "higher_order" not in program.code  # codegen refuses get_attr: the full pipeline tests write it out
    assert family.max_diff <= 1e-4


class _NestedNoGrad(torch.nn.Module):
    """Nested grad-mode regions: export turns them into sibling wrapped regions."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        with torch.no_grad():
            y = x * self.scale
            with torch.enable_grad():
                y = y.sin()
            z = y.cos()
        return (x + y) * z


def test_nested_regions_are_inlined_and_match():
    module = _NestedNoGrad()
    x = torch.randn(3, 8)
    program = rewrite_module(module, x)
    assert program.report["inlined_region"] >= 1
    assert not [n for n in program.gm.graph.nodes if n.op == "get_attr"]
    fresh = torch.randn(3, 8)
    assert max_diff(program(fresh), module(fresh)) <= 1e-6


def test_bert_has_nothing_to_inline(families):
    assert "inlined_region" not in families("bert").program.report
