"""The attention pass: sdpa → kernl.attention with mask, causal, scale and GQA folded; holds back where it must."""

import pytest
import torch
import torch.nn.functional as F

from kernl.compiler.passes._fx import fake
from tests.compiler.rewrite_utils import max_diff, rewrite_module

aten = torch.ops.aten


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_fires_on_families_and_matches(families, name):
    family = families(name)
    program = family.program
    assert program.rewrites["attention"] == family.model.config.num_hidden_layers
    assert "scaled_dot_product_attention" not in program.code
    for call in program.calls(torch.ops.kernl.attention.default):
        q, k, v, mask, causal, scale = call.args
        # HF's padding mask reaches the kernel un-expanded ([b, 1, s, s]), and the scale comes from the graph.
        assert fake(mask).shape[1] == 1 and mask.target is not aten.expand.default
        assert scale == pytest.approx(fake(q).shape[-1] ** -0.5)
    assert family.max_diff <= 1e-4


def test_llama_kv_heads_are_not_repeated(families):
    program = families("llama").program
    for call in program.calls(torch.ops.kernl.attention.default):
        q, k, v = call.args[:3]
        assert fake(q).shape[1] == 4 and fake(k).shape[1] == fake(v).shape[1] == 2
    assert not program.calls(aten.expand.default) or all(fake(n).dim() != 5 for n in program.calls(aten.expand.default))


class _Sdpa(torch.nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, q, k, v, mask=None):
        if mask is not None:
            mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.options)


def _qkv(batch=2, heads=2, seq_q=8, seq_k=8, head_dim=16, heads_kv=None):
    heads_kv = heads_kv or heads
    return (
        torch.randn(batch, heads, seq_q, head_dim),
        torch.randn(batch, heads_kv, seq_k, head_dim),
        torch.randn(batch, heads_kv, seq_k, head_dim),
    )


@pytest.mark.parametrize(
    "options, mask, heads_kv",
    [
        ({"is_causal": True}, None, None),
        ({"scale": 0.3}, "float", None),
        ({}, "bool", None),
        ({"enable_gqa": True}, None, 1),
    ],
    ids=["causal", "float-mask-scale", "bool-mask", "enable-gqa"],
)
def test_options_fold_and_match(options, mask, heads_kv):
    q, k, v = _qkv(heads_kv=heads_kv)
    args = (q, k, v)
    if mask == "float":
        args += (torch.randn(2, 1, 1, 8),)
    elif mask == "bool":
        args += (torch.rand(2, 1, 8, 8) > 0.3,)
    module = _Sdpa(**options)
    program = rewrite_module(module, *args)
    assert program.rewrites == {"attention": 1}
    (call,) = program.calls(torch.ops.kernl.attention.default)
    if mask is not None:
        assert call.args[3].op == "placeholder"  # the un-expanded mask input itself
    fresh = [torch.randn_like(a) if a.is_floating_point() else a for a in args]
    assert max_diff(program(*fresh), module(*fresh)) <= 1e-5


@pytest.mark.parametrize(
    "options, shapes",
    [
        ({}, {"head_dim": 288}),  # over the kernel's 256
        ({"dropout_p": 0.5}, {}),  # dropout is not an inference op
        ({"is_causal": True}, {"seq_q": 4, "seq_k": 8}),  # torch's causal is top-left, the kernel's bottom-right
    ],
    ids=["head-dim-288", "dropout", "causal-unequal-seq"],
)
def test_does_not_fire(options, shapes):
    q, k, v = _qkv(batch=1, **shapes)
    module = _Sdpa(**options)
    program = rewrite_module(module, q, k, v)
    assert "attention" not in program.report
    assert "scaled_dot_product_attention" in program.code
    if "dropout_p" not in options:
        assert max_diff(program(q, k, v), module(q, k, v)) <= 1e-6
