"""A decode step's rotary embedding folded into its attention: kernl.rotary of q and k_new, then
decode_attention_append, in the decode attention kernel's one launch.

The rotary kernel of a decode step moves a few KB; what it costs is its launch and the dependency wait of the
attention behind it, several µs a layer at batch 1. Folded, each attention program rotates the query heads it
reads, in registers, and the program that appends the new key rotates it before writing it to the cache.
"""

from __future__ import annotations

import torch

from kernl.kernels._backend import HAS_TRITON, check_tensor, runs_triton
from kernl.kernels._custom_ops import custom_op
from kernl.kernels.decode_attention import (
    cache_append_reference,
    check_decode_attention_append_args,
    decode_attention_reference,
    lengths_of,
)
from kernl.kernels.rotary import rotary_reference

if HAS_TRITON:
    from kernl.kernels._decode_attention_kernel import launch_decode_attention


def check_rotary_rows(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """cos and sin of one token a row; raises a ValueError naming the argument."""
    check_tensor("cos", cos, ndim=2)  # any float dtype, read in fp32 (as kernl.rotary)
    if cos.device != q.device:
        raise ValueError(f"cos: on {cos.device}, but q is on {q.device}")
    batch, _, head_dim = q.shape
    if cos.shape[0] not in (1, batch):
        raise ValueError(f"cos: {cos.shape[0]} rows (shape {tuple(cos.shape)}), expected 1 or q's batch {batch}")
    rot = cos.shape[1]
    if rot < 2 or rot % 2 or rot > head_dim:
        raise ValueError(f"cos: rot_dim (last dim) {rot} must be even and in 2..head_dim ({head_dim})")
    check_tensor("sin", sin, ndim=2, like=cos)
    if sin.shape != cos.shape:
        raise ValueError(f"sin: shape {tuple(sin.shape)} differs from cos's {tuple(cos.shape)}")


def decode_attention_append_rotary_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """The unfolded step in plain torch: rotary_reference of q and k_new (one token a row), the rotated key
    appended in place, then decode_attention_reference over [0, positions[b]]."""
    q_rot, k_rot = rotary_reference(q.unsqueeze(2), k_new.unsqueeze(2), cos.unsqueeze(1), sin.unsqueeze(1))
    cache_append_reference(k_cache, v_cache, k_rot.squeeze(2), v_new, positions)
    return decode_attention_reference(
        q_rot.squeeze(2), k_cache, v_cache, lengths_of(positions, k_cache.shape[2]), scale
    )


def decode_attention_append_rotary(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """decode_attention_append of q and k_new after kernl.rotary (HF's rotate-half, partial rotary included).

    q, k_cache, v_cache, k_new, v_new, positions: as in decode_attention_append (q and k_new unrotated). cos, sin:
    [batch or 1, rot_dim], each row's token's values indexed by output dim (HF's cos[..., :rot_dim]), any float
    dtype, rot_dim even and <= head_dim; dims past rot_dim pass through. The rotated key is what the cache
    holds afterwards. Returns a new contiguous [batch, heads_q, head_dim] in q's dtype.
    """
    check_decode_attention_append_args(q, k_cache, v_cache, k_new, v_new, positions)
    check_rotary_rows(q, cos, sin)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not runs_triton(q):
        return decode_attention_append_rotary_reference(q, k_cache, v_cache, k_new, v_new, positions, cos, sin, scale)
    return launch_decode_attention(q, k_cache, v_cache, positions, k_new, v_new, scale, cos=cos, sin=sin)


def decode_attention_append_rotary_call(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scale: float | None,
) -> torch.Tensor:
    return decode_attention_append_rotary(q, k_cache, v_cache, k_new, v_new, positions, cos, sin, scale=scale)


decode_attention_append_rotary_op = custom_op(
    "kernl::decode_attention_append_rotary", decode_attention_append_rotary_call, mutates_args=("k_cache", "v_cache")
)


@decode_attention_append_rotary_op.register_fake
def _(q, k_cache, v_cache, k_new, v_new, positions, cos, sin, scale):
    return q.new_empty(q.shape)
