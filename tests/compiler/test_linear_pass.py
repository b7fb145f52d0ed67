"""The linear pass: linears (and GPT-2's Conv1D) → kernl.linear with activation and residual folded in."""

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import NewGELUActivation
from transformers.pytorch_utils import Conv1D

from tests.compiler.rewrite_utils import expected_rewrites, max_diff, rewrite_module

kernl = torch.ops.kernl


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_fires_on_families_and_matches(families, name):
    family = families(name)
    program = family.program
    want = expected_rewrites(name, family.model.config)
    # BERT: fused QKV, output, intermediate (gelu), output per layer, and the pooler (tanh).
    # GPT-2: c_attn, c_proj, c_fc (gelu_new written out), c_proj per layer. Llama: QKV, o_proj, down_proj.
    assert program.rewrites["linear"] == want["linear"]
    assert program.rewrites.get("linear_activation", 0) == want.get("linear_activation", 0)
    # Every residual add here feeds a norm, which takes it first (add_layer_norm / add_rms_norm).
    assert "linear_residual" not in program.report
    for op in ("aten.linear", "aten.addmm", "aten.gelu", "aten.tanh", "aten.pow"):
        assert op not in program.code
    assert family.max_diff <= 1e-4


def test_gpt2_conv1d_weights_are_read_transposed(families):
    calls = families("gpt2").program.calls(kernl.linear.default)
    assert calls and all(c.args[5] is True for c in calls)
    assert sum(c.args[3] == "gelu_tanh" for c in calls) == 2


class _Residual(torch.nn.Module):
    """x + fc2(act(fc1(x))), with the residual optionally computed after fc2 (the fused call moves down)."""

    def __init__(self, late_residual=False):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.late_residual = late_residual

    def forward(self, x):
        y = self.fc2(F.relu(self.fc1(x)))
        return y + (x.sin() if self.late_residual else x)


class _Conv1dMlp(torch.nn.Module):
    """GPT-2's MLP: Conv1D (addmm on a [in, out] weight), gelu_new written out, Conv1D, plus a bias-free matmul."""

    def __init__(self):
        super().__init__()
        self.fc, self.proj, self.act = Conv1D(32, 16), Conv1D(16, 32), NewGELUActivation()
        self.w = torch.nn.Parameter(torch.randn(16, 8))

    def forward(self, x):
        return self.proj(self.act(self.fc(x))) @ self.w


@pytest.mark.parametrize(
    "module, want",
    [
        (_Residual(), {"linear": 2, "linear_activation": 1, "linear_residual": 1}),
        (_Residual(late_residual=True), {"linear": 2, "linear_activation": 1, "linear_residual": 1}),
        (_Conv1dMlp(), {"linear": 3, "linear_activation": 1}),
    ],
    ids=["residual", "late-residual", "conv1d"],
)
def test_folds_and_matches(module, want):
    program = rewrite_module(module.eval(), torch.randn(2, 5, 16))
    assert program.rewrites == want
    fresh = torch.randn(2, 5, 16)
    assert max_diff(program(fresh), module(fresh)) <= 1e-5


class _Held(torch.nn.Module):
    def __init__(self, case):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)
        self.case = case
        self.bias = torch.nn.Parameter(torch.randn(16))

    def forward(self, x):
        y = self.fc(x)
        if self.case == "reused-before-activation":
            return F.gelu(y) + y
        if self.case == "broadcast-residual":
            return y + self.bias  # [16] broadcast over [2, 5, 16]: not a residual
        return y + x[:, :1]  # [2, 1, 16] broadcast over the linear's [2, 5, 16]


@pytest.mark.parametrize("case", ["reused-before-activation", "broadcast-residual", "broadcast-input"])
def test_does_not_fold(case):
    module = _Held(case)
    x = torch.randn(2, 5, 16)
    program = rewrite_module(module, x)
    assert program.rewrites == {"linear": 1}
    assert max_diff(program(x), module(x)) <= 1e-5
