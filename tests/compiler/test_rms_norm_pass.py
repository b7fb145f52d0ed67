"""The RMSNorm pass: HF's RMSNorm subgraph → kernl.rms_norm / add_rms_norm; holds back where it must."""

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tests.compiler.rewrite_utils import max_diff, rewrite_module

kernl = torch.ops.kernl


def test_fires_on_llama_and_matches(families):
    family = families("llama")
    program = family.program
    # Every layer's two norms follow a residual add, except the very first (on the embeddings).
    assert (
        program.rewrites["rms_norm"] == 1
        and program.rewrites["add_rms_norm"] == 2 * family.model.config.num_hidden_layers
    )
    assert "rsqrt" not in program.code
    eps = family.model.config.rms_norm_eps
    calls = program.calls(kernl.rms_norm.default) + program.calls(kernl.add_rms_norm.default)
    assert {(c.args[-2], c.args[-1]) for c in calls} == {(eps, 0.0)}
    assert family.max_diff <= 1e-4


class _PreNorm(torch.nn.Module):
    """A pre-norm block's sum: normalised and carried on as the residual stream."""

    def __init__(self, norm, broadcast=False):
        super().__init__()
        self.norm = norm
        self.broadcast = broadcast
        torch.nn.init.normal_(norm.weight)

    def forward(self, x, y):
        total = x + (y[0, 0] if self.broadcast else y)
        return self.norm(total) * 2, total


def _xy(hidden=32, dtype=torch.float32):
    return torch.randn(2, 5, hidden, dtype=dtype), torch.randn(2, 5, hidden, dtype=dtype)


@pytest.mark.parametrize(
    "norm, eps, offset",
    [
        (LlamaRMSNorm(32, eps=1e-5), 1e-5, 0.0),
        (GemmaRMSNorm(32, eps=1e-3), 1e-3, 1.0),
        (torch.nn.RMSNorm(32, eps=1e-4), 1e-4, 0.0),
        (torch.nn.RMSNorm(32), torch.finfo(torch.float32).eps, 0.0),
    ],
    ids=["llama", "gemma", "torch", "torch-default-eps"],
)
def test_add_rms_norm_reads_eps_and_offset_and_matches(norm, eps, offset):
    module = _PreNorm(norm)
    program = rewrite_module(module, *_xy())
    assert program.rewrites == {"add_rms_norm": 1}
    (call,) = program.calls(kernl.add_rms_norm.default)
    assert call.args[3:] == (pytest.approx(eps), offset)
    fresh = _xy()
    assert max_diff(program(*fresh), module(*fresh)) <= 1e-5


def test_broadcasting_add_is_not_fused():
    module = _PreNorm(LlamaRMSNorm(32), broadcast=True)
    args = _xy()
    program = rewrite_module(module, *args)
    assert program.rewrites == {"rms_norm": 1}
    assert max_diff(program(*args), module(*args)) <= 1e-5


def test_does_not_fire_when_an_fp32_weight_promotes_the_output():
    # HF's `weight * x.to(fp16)` with an fp32 weight returns fp32; the kernel returns x's dtype.
    module = _PreNorm(LlamaRMSNorm(32))
    program = rewrite_module(module, *_xy(dtype=torch.float16))
    assert "rms_norm" not in program.report and "add_rms_norm" not in program.report
    assert "rsqrt" in program.code
