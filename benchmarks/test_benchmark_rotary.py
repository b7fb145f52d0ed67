"""rotary on q and k in one launch against HF's eager rotate-half formula, in GB/s of copy bandwidth."""

import pytest
import torch

from kernl.kernels import rotary

HEAD_DIM = 128


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _torch_rotary(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb: eager ops in the model's dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


@pytest.mark.parametrize("implementation", ["kernl", "torch"])
@pytest.mark.parametrize("heads_q, heads_k", [(32, 8)])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("seq", [128, 512, 2048])
def test_benchmark_rotary(measure, benchmark, implementation, heads_q, heads_k, batch, seq):
    benchmark.group = f"rotary {batch}x{seq} {heads_q}/{heads_k} heads"
    dtype = torch.float16
    # Views of the q and k projection outputs [batch, seq, heads * head_dim], as a Llama layer has them.
    q = torch.randn(batch, seq, heads_q * HEAD_DIM, device="cuda", dtype=dtype)
    k = torch.randn(batch, seq, heads_k * HEAD_DIM, device="cuda", dtype=dtype)
    q = q.view(batch, seq, heads_q, HEAD_DIM).transpose(1, 2)
    k = k.view(batch, seq, heads_k, HEAD_DIM).transpose(1, 2)
    pos = torch.arange(seq, device="cuda", dtype=torch.float32)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda", dtype=torch.float32) / HEAD_DIM)
    freqs = pos[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[None]  # [1, seq, head_dim]: HF's position_ids [1, seq]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    fn = (lambda: rotary(q, k, cos, sin)) if implementation == "kernl" else (lambda: _torch_rotary(q, k, cos, sin))
    # The floor: read q, k, cos and sin once, write rotated q and k.
    qk_bytes = (q.numel() + k.numel()) * q.element_size()
    measure(fn, bytes_moved=2 * qk_bytes + cos.numel() * cos.element_size() + sin.numel() * sin.element_size())
