"""Programmatic dependent launch: a kernel that started early must still read what the previous one wrote."""

import pytest
import torch

from kernl.kernels import _pdl, attention, gated_linear, linear, rms_norm, rotary


def test_pdl_is_off_where_kernels_run_on_cpu():
    assert _pdl.pdl_options(torch.randn(4)) == {"USE_PDL": False}


def test_pdl_switch_turns_it_off(monkeypatch):
    monkeypatch.setattr(_pdl, "ENABLED", False)
    assert not _pdl.use_pdl(torch.randn(4))


@pytest.mark.parametrize(("most", "k", "span"), [(512, 4096, 512), (2048, 4096, 2048), (2048, 100, 128), (512, 8, 64)])
def test_the_prefetch_span_is_k_rounded_up_within_the_switch(monkeypatch, most, k, span):
    monkeypatch.setattr(_pdl, "PREFETCH_MAX_K", most)
    on = {"USE_PDL": True, "launch_pdl": True}
    assert _pdl.prefetch_span(on, 1, k) == span
    assert _pdl.prefetch_span(on, 65, k) == 0  # large M: the weight is read by many programs, no prefetch
    assert _pdl.prefetch_span({"USE_PDL": False}, 1, k) == 0


@pytest.mark.parametrize("value", ["100", "32", "x", ""])
def test_a_bad_prefetch_span_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv("KERNL_PREFETCH_K", value)
    with pytest.raises(ValueError, match="KERNL_PREFETCH_K"):
        _pdl._span_from_env()


def _decoder_chain(x, weights, cos, sin, heads, kv_heads):
    """A few llama-like blocks: every kernel reads the output of the one just before it."""
    batch, seq, hidden = x.shape
    head_dim = hidden // heads
    for w_norm, w_qkv, w_o, w_gate, w_up, w_down in weights:
        h = rms_norm(x, w_norm, 1e-6)
        qkv = linear(h, w_qkv)
        q, k, v = qkv.split([hidden, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q = q.view(batch, seq, heads, head_dim).transpose(1, 2)
        k = k.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        v = v.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        q, k = rotary(q, k, cos, sin)
        o = attention(q, k, v, causal=True).transpose(1, 2).reshape(batch, seq, hidden)
        x = linear(o, w_o, residual=x, weight_transposed=True)  # [in, out], as GPT-2's Conv1D stores it
        h = rms_norm(x, w_norm, 1e-6)
        x = linear(gated_linear(h, w_gate, w_up), w_down, residual=x)
    return x


@pytest.mark.gpu
@pytest.mark.skipif(not _pdl.HAS_GDC, reason="this Triton has no grid dependency control")
@pytest.mark.parametrize("batch, seq", [(1, 16), (4, 128)])
def test_graph_with_pdl_matches_plain_launches(monkeypatch, batch, seq):
    """The chain captured in a CUDA graph with PDL on gives bit-identical results to launches without it,
    replayed on fresh inputs: a kernel reading its predecessor's output too early would differ."""
    assert _pdl.use_pdl(torch.empty(1, device="cuda")), "an H100 should launch with PDL"
    hidden, heads, kv_heads, inter, layers = 512, 8, 2, 1024, 3
    head_dim = hidden // heads

    def w(*shape):
        return torch.randn(shape, device="cuda", dtype=torch.float16) / shape[-1] ** 0.5

    weights = [
        (1 + 0.1 * w(hidden), w(hidden + 2 * kv_heads * head_dim, hidden), w(hidden, hidden),
         w(inter, hidden), w(inter, hidden), w(hidden, inter))
        for _ in range(layers)
    ]  # fmt: skip
    angles = torch.rand(seq, head_dim, device="cuda") * 6.3
    cos, sin = angles.cos().half(), angles.sin().half()
    static_x = torch.randn(batch, seq, hidden, device="cuda", dtype=torch.float16)
    _decoder_chain(static_x, weights, cos, sin, heads, kv_heads)  # tune and compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = _decoder_chain(static_x, weights, cos, sin, heads, kv_heads)
    monkeypatch.setattr(_pdl, "ENABLED", False)
    for _ in range(3):
        x = torch.randn(batch, seq, hidden, device="cuda", dtype=torch.float16)
        static_x.copy_(x)
        graph.replay()
        want = _decoder_chain(x, weights, cos, sin, heads, kv_heads)
        torch.cuda.synchronize()
        assert torch.isfinite(want).all()
        assert torch.equal(static_y, want)
