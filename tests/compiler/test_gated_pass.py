"""The gated-MLP pass: act(x @ Wg.T) * (x @ Wu.T) → kernl.gated_linear; holds back where it must."""

import pytest
import torch
import torch.nn.functional as F

from tests.compiler.rewrite_utils import max_diff, rewrite_module

kernl = torch.ops.kernl


def test_fires_on_llama_and_matches(families):
    family = families("llama")
    program = family.program
    assert program.rewrites["gated_linear"] == family.model.config.num_hidden_layers
    assert {c.args[3] for c in program.calls(kernl.gated_linear.default)} == {"silu"}
    assert "aten.silu" not in program.code
    assert family.max_diff <= 1e-4


class _GatedMlp(torch.nn.Module):
    def __init__(self, act, reuse_gate=False, bias=False):
        super().__init__()
        self.gate = torch.nn.Linear(32, 48, bias=bias)
        self.up = torch.nn.Linear(32, 48, bias=False)
        self.down = torch.nn.Linear(48, 32, bias=False)
        self.act, self.reuse_gate = act, reuse_gate

    def forward(self, x):
        g = self.gate(x)
        h = self.act(g) * self.up(x)
        return self.down(h + g if self.reuse_gate else h)


@pytest.mark.parametrize(
    "act, name",
    [(F.silu, "silu"), (lambda g: F.gelu(g, approximate="tanh"), "gelu_tanh"), (F.gelu, "gelu")],
    ids=["swiglu", "geglu-tanh", "geglu"],
)
def test_fires_and_matches(act, name):
    module = _GatedMlp(act)
    x = torch.randn(2, 5, 32)
    program = rewrite_module(module, x)
    assert program.rewrites == {"gated_linear": 1, "linear": 1}
    (call,) = program.calls(kernl.gated_linear.default)
    assert call.args[3] == name
    fresh = torch.randn(2, 5, 32)
    assert max_diff(program(fresh), module(fresh)) <= 1e-5


@pytest.mark.parametrize("options", [{"reuse_gate": True}, {"bias": True}], ids=["gate-reused", "gate-bias"])
def test_does_not_fire(options):
    module = _GatedMlp(F.silu, **options)
    x = torch.randn(2, 5, 32)
    program = rewrite_module(module, x)
    assert "gated_linear" not in program.report
    assert "aten.silu" in program.code
    assert max_diff(program(x), module(x)) <= 1e-5
