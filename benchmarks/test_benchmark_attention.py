"""attention against torch's F.scaled_dot_product_attention, fp16, in TFLOP/s of the fp16 matmul peak."""

import pytest
import torch
import torch.nn.functional as F

from kernl.kernels import attention

# (batch, heads, seq, head_dim, causal): SDPA takes its flash path here; kernl should at least match it.
NO_MASK = [(8, 12, 512, 64, False), (8, 12, 1024, 64, False), (8, 12, 2048, 64, False), (1, 32, 4096, 128, True)]
# (batch, heads, seq): BERT-like padding masks push SDPA off flash; kernl should be >= 1.3x faster.
PADDING = [(8, 12, 128), (8, 12, 256), (8, 12, 512), (32, 12, 128), (32, 12, 256), (32, 12, 512)]


def _flops(batch, heads, seq_q, seq_k, head_dim, causal):
    # Two matmuls of 2 * sq * sk * d each; causal computes about half of them.
    flops = 4 * batch * heads * seq_q * seq_k * head_dim
    return flops / 2 if causal else flops


def _qkv(batch, heads, seq, head_dim):
    return [torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.float16) for _ in range(3)]


@pytest.mark.parametrize("implementation", ["kernl", "torch"])
@pytest.mark.parametrize("batch, heads, seq, head_dim, causal", NO_MASK)
def test_benchmark_attention(measure, benchmark, implementation, batch, heads, seq, head_dim, causal):
    benchmark.group = f"attention b{batch} h{heads} s{seq} d{head_dim}{' causal' if causal else ''}"
    q, k, v = _qkv(batch, heads, seq, head_dim)
    kernl_fn = lambda: attention(q, k, v, causal=causal)  # noqa: E731
    torch_fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    measure(kernl_fn if implementation == "kernl" else torch_fn, flops=_flops(batch, heads, seq, seq, head_dim, causal))


@pytest.mark.parametrize("implementation", ["kernl", "torch"])
@pytest.mark.parametrize("batch, heads, seq", PADDING)
def test_benchmark_attention_padding_mask(measure, benchmark, implementation, batch, heads, seq):
    benchmark.group = f"attention+padding mask b{batch} h{heads} s{seq} d64"
    q, k, v = _qkv(batch, heads, seq, 64)
    # Additive [b, 1, 1, k] as Hugging Face builds it: finfo.min past each length, one sequence with -inf.
    lengths = torch.randint(seq // 4, seq + 1, (batch,), device="cuda")
    hidden = torch.arange(seq, device="cuda")[None, :] >= lengths[:, None]
    mask = torch.zeros(batch, 1, 1, seq, device="cuda", dtype=torch.float16)
    mask = mask.masked_fill(hidden[:, None, None, :], torch.finfo(torch.float16).min)
    mask[0].masked_fill_(hidden[0], float("-inf"))
    kernl_fn = lambda: attention(q, k, v, mask=mask)  # noqa: E731
    torch_fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    measure(kernl_fn if implementation == "kernl" else torch_fn, flops=_flops(batch, heads, seq, seq, 64, False))
