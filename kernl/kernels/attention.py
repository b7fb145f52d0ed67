"""Scaled dot-product attention (forward): masks, causal, grouped-query heads, strided q/k/v."""

from __future__ import annotations

import torch

from kernl.kernels._backend import FLOAT_DTYPES, HAS_TRITON, check_tensor, runs_triton
from kernl.kernels._custom_ops import custom_op

if HAS_TRITON:
    from kernl.kernels._attention_kernel import launch_attention

MAX_HEAD_DIM = 256


def check_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Shapes, dtypes and devices of attention's inputs; raises a ValueError naming the argument."""
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4, like=q)
    check_tensor("v", v, ndim=4, like=q)
    batch, heads_q, seq_q, head_dim = q.shape
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim must be in 1..{MAX_HEAD_DIM}, got shape {tuple(q.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k: shape {tuple(k.shape)} does not match q's batch and head_dim {tuple(q.shape)}")
    if k.shape[1] == 0 or heads_q % k.shape[1] != 0:
        raise ValueError(f"k: heads_q ({heads_q}) must be a multiple of heads_kv ({k.shape[1]})")
    if v.shape != k.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} differs from k's {tuple(k.shape)}")
    if mask is None:
        return
    check_tensor("mask", mask, dtypes=(torch.bool, *FLOAT_DTYPES))
    if mask.device != q.device:
        raise ValueError(f"mask: on {mask.device}, but q is on {q.device}")
    target = (batch, heads_q, seq_q, k.shape[2])
    padded = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    if mask.dim() > 4 or any(m not in (1, t) for m, t in zip(padded, target)):
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not broadcast to {target}")


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain torch in fp32: softmax(q k^T * scale + mask) v with kv heads repeated; rows seeing no key give 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    seq_q, seq_k = q.shape[2], k.shape[2]
    if seq_k == 0:
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = q.float() @ kf.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    if causal:
        # Bottom-right aligned, as flash-attention: query i sees keys j <= i + seq_k - seq_q.
        visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril(seq_k - seq_q)
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(torch.isneginf(scores.amax(-1, keepdim=True)), 0.0, probs)
    return (probs @ vf).to(q.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention forward, flash-attention style: scores never leave the chip.

    q: [batch, heads_q, seq_q, head_dim]; k, v: [batch, heads_kv, seq_k, head_dim], heads_q % heads_kv == 0
    (grouped-query attention: q head h reads kv head h // (heads_q // heads_kv)). Any strides: views of a
    fused QKV projection are read in place. head_dim up to 256.
    mask: additive (float) or boolean (True keeps the key), broadcastable to [batch, heads_q, seq_q, seq_k],
    e.g. [batch, 1, 1, seq_k] padding or [batch, 1, seq_q, seq_k]; never expanded in memory.
    causal: query i sees keys j <= i + seq_k - seq_q (bottom-right aligned). scale: default head_dim ** -0.5.
    Returns a new [batch, heads_q, seq_q, head_dim] tensor in q's dtype, stored as [batch, seq_q, heads_q,
    head_dim] (out.transpose(1, 2) is contiguous); a row with every key masked comes out as zeros.
    """
    check_attention_args(q, k, v, mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not runs_triton(q):
        out = attention_reference(q, k, v, mask=mask, causal=causal, scale=scale)
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # the kernel's layout
    return launch_attention(q, k, v, mask, causal, scale)


def attention_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, scale: float | None
) -> torch.Tensor:
    return attention(q, k, v, mask=mask, causal=causal, scale=scale)


attention_op = custom_op("kernl::attention", attention_call, mutates_args=())


@attention_op.register_fake
def _(q, k, v, mask, causal, scale):
    batch, heads, seq, head_dim = q.shape
    return q.new_empty((batch, seq, heads, head_dim)).transpose(1, 2)
