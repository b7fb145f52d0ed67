"""The inline pass: no-grad (and autocast-off) regions export wraps in higher-order ops become plain nodes."""

import pytest
import torch
from transformers.models.llama.modeling_llama import rotate_half

from tests.compiler.rewrite_utils import max_diff, rewrite_module


def _no_region_left(program) -> bool:
    # codegen refuses get_attr: the full pipeline tests write the program out
    return "higher_order" not in program.code and not [n for n in program.gm.graph.nodes if n.op == "get_attr"]


def test_llama_rotary_is_flat_and_rewritten(families):
    # transformers 5.17 computes the rotary tables in a no-grad region, 5.24 as plain code: either way no wrapper
    # is left, and every layer's q and k go through the rotary kernel.
    family = families("llama")
    program = family.program
    assert _no_region_left(program)
    assert program.rewrites["rotary"] == family.model.config.num_hidden_layers
    assert "aten.neg" not in program.code
    assert family.max_diff <= 1e-4


class _WrappedRotary(torch.nn.Module):
    """Llama's rotary as transformers 5.17 writes it: tables under no_grad, optionally with autocast off inside
    (maybe_autocast opens that region only under an enabled outer autocast; torch.autocast always does)."""

    def __init__(self, autocast_off: bool):
        super().__init__()
        self.autocast_off = autocast_off
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16), persistent=False)

    def _tables(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def forward(self, q, k, position_ids):
        with torch.no_grad():
            if self.autocast_off:
                with torch.autocast(device_type=q.device.type, enabled=False):
                    cos, sin = self._tables(q, position_ids)
            else:
                cos, sin = self._tables(q, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@pytest.mark.parametrize("autocast_off", [False, True], ids=["no_grad", "no_grad+autocast_off"])
def test_wrapped_rotary_is_inlined_and_rewritten(autocast_off):
    module = _WrappedRotary(autocast_off)
    position_ids = torch.arange(8).expand(2, 8)
    program = rewrite_module(module, torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16), position_ids)
    assert program.rewrites == {"inlined_region": 1 + autocast_off, "rotary": 1}
    assert _no_region_left(program)
    q, k = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16)
    assert max_diff(program(q, k, position_ids), module(q, k, position_ids)) <= 1e-6


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
    assert _no_region_left(program)
    fresh = torch.randn(3, 8)
    assert max_diff(program(fresh), module(fresh)) <= 1e-6


def test_bert_has_nothing_to_inline(families):
    assert "inlined_region" not in families("bert").program.report
