"""The projection pass: linears sharing an input → one linear over concatenated weights, read through slices."""

import torch

from tests.compiler.rewrite_utils import max_diff, rewrite_module


def test_fires_on_bert_and_matches(families):
    family = families("bert")
    program = family.program
    assert program.rewrites["fused_projections"] == family.model.config.num_hidden_layers  # Q, K and V of each layer
    fused = program.weights["p_encoder_layer_0_attention_self_fused_query_key_value_weight"]
    assert fused.shape == (96, 32)
    assert program.weights["p_encoder_layer_0_attention_self_fused_query_key_value_bias"].shape == (96,)
    # The separate weights left the program (and so the bundle).
    assert not any("self_query" in name for name in program.weights)
    assert family.max_diff <= 1e-4


def test_fires_on_llama_qkv_only(families):
    family = families("llama")
    program = family.program
    assert (
        program.rewrites["fused_projections"] == family.model.config.num_hidden_layers
    )  # gate and up went to gated_linear first
    assert program.weights["p_layers_0_self_attn_fused_q_k_v_proj_weight"].shape == (64 + 32 + 32, 64)


def test_nothing_to_fuse_in_gpt2(families):
    assert "fused_projections" not in families("gpt2").program.report  # c_attn is one Conv1D already


class _Siblings(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 24, bias=True)
        self.b = torch.nn.Linear(16, 8, bias=False)
        self.c = torch.nn.Linear(24, 8)  # reads another input: not a sibling

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        # view(2, -1) merges the sequence with the feature dim: impossible on a column slice, fine as reshape.
        return a.view(2, -1), b.view(2, -1) + self.c(a).view(2, -1)


def test_mixed_biases_and_views_match():
    module = _Siblings()
    x = torch.randn(2, 5, 16)
    program = rewrite_module(module, x)
    assert program.rewrites == {"fused_projections": 1, "linear": 2}
    fused_bias = next(v for k, v in program.weights.items() if "fused" in k and k.endswith("bias"))
    assert torch.equal(fused_bias[24:], torch.zeros(8))  # b has no bias: zeros in its columns
    fresh = torch.randn(2, 5, 16)
    assert max_diff(program(fresh), module(fresh)) <= 1e-5


def test_single_linear_is_left_alone():
    module = torch.nn.Linear(16, 8)
    program = rewrite_module(module, torch.randn(3, 16))
    assert program.rewrites == {"linear": 1}
