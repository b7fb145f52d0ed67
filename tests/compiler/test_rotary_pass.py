"""The rotary pass: HF's rotate-half on q and k → one kernl.rotary call; holds back where it must."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

from tests.compiler.rewrite_utils import max_diff, rewrite_module


def test_fires_on_llama_and_matches(families):
    family = families("llama")
    program = family.program
    assert program.rewrites["rotary"] == family.model.config.num_hidden_layers  # q and k of each layer: one call
    assert "aten.neg" not in program.code and "kernl.rotary" in program.code
    assert family.max_diff <= 1e-4


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_absent_from_families_without_rotary(families, name):
    assert "rotary" not in families(name).program.report


def _rotate(x, cos, sin):
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class _Rotary(torch.nn.Module):
    """HF's apply_rotary_pos_emb, optionally on the first `rot` dims only (GPT-NeoX / Phi partial rotary)."""

    def __init__(self, rot=None, k_cos_offset=False):
        super().__init__()
        self.rot, self.k_cos_offset = rot, k_cos_offset

    def forward(self, q, k, cos, sin):
        if self.k_cos_offset:  # k rotated by other angles than q: not one rotary call
            return _rotate(q, cos, sin), _rotate(k, cos + 1, sin)
        if self.rot is None:
            return apply_rotary_pos_emb(q, k, cos, sin)
        q_rot, q_pass = q[..., : self.rot], q[..., self.rot :]
        k_rot, k_pass = k[..., : self.rot], k[..., self.rot :]
        q_out, k_out = apply_rotary_pos_emb(q_rot, k_rot, cos, sin)
        return torch.cat((q_out, q_pass), dim=-1), torch.cat((k_out, k_pass), dim=-1)


def _inputs(rot=16, head_dim=16):
    q, k = torch.randn(2, 4, 7, head_dim), torch.randn(2, 2, 7, head_dim)
    angles = torch.randn(1, 7, rot // 2)
    angles = torch.cat((angles, angles), dim=-1)
    return q, k, angles.cos(), angles.sin()


@pytest.mark.parametrize("rot", [None, 8], ids=["full", "partial"])
def test_fires_and_matches(rot):
    module = _Rotary(rot)
    program = rewrite_module(module, *_inputs(rot or 16))
    assert program.rewrites == {"rotary": 1}
    fresh = _inputs(rot or 16)
    assert max_diff(program(*fresh), module(*fresh)) <= 1e-6


def test_does_not_fire_when_q_and_k_use_other_angles():
    module = _Rotary(k_cos_offset=True)
    args = _inputs()
    program = rewrite_module(module, *args)
    assert "rotary" not in program.report
    assert max_diff(program(*args), module(*args)) <= 1e-6
