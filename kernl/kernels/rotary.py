"""Rotary position embedding of q and k, Hugging Face's rotate-half convention, partial rotary included."""

from __future__ import annotations

import torch

from kernl.kernels._backend import HAS_TRITON, check_tensor, runs_triton
from kernl.kernels._custom_ops import custom_op

if HAS_TRITON:
    from kernl.kernels._rotary_kernel import launch_rotary


def check_rotary_args(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Checks of rotary's inputs; raises a ValueError naming the argument."""
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4, like=q)
    batch, _, seq, head_dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq, head_dim):
        raise ValueError(f"k: shape {tuple(k.shape)} differs from q's {tuple(q.shape)} in batch, seq or head_dim")
    # cos/sin may be in any float dtype (HF builds them in fp32 or the model's dtype): read in fp32 either way.
    check_tensor("cos", cos, ndim=(2, 3))
    if cos.device != q.device:
        raise ValueError(f"cos: on {cos.device}, but q is on {q.device}")
    if cos.shape[-2] != seq:
        raise ValueError(f"cos: seq {cos.shape[-2]} (shape {tuple(cos.shape)}) differs from q's {seq}")
    if cos.dim() == 3 and cos.shape[0] not in (1, batch):
        raise ValueError(f"cos: batch {cos.shape[0]} must be 1 or q's {batch}")
    rot = cos.shape[-1]
    if rot < 2 or rot % 2 or rot > head_dim:
        raise ValueError(f"cos: rot_dim (last dim) {rot} must be even and in 2..head_dim ({head_dim})")
    check_tensor("sin", sin, ndim=cos.dim(), like=cos)
    if sin.shape != cos.shape:
        raise ValueError(f"sin: shape {tuple(sin.shape)} differs from cos's {tuple(cos.shape)}")


def rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, HF's apply_rotary_pos_emb (with the partial-rotary concat) in fp32, cast back."""
    rot = cos.shape[-1]
    # [seq, rot] or [batch, seq, rot] to broadcast over heads, as HF's unsqueeze(1).
    cos = cos.float().unsqueeze(-3)
    sin = sin.float().unsqueeze(-3)

    def apply(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x_rot, x_pass = x32[..., :rot], x32[..., rot:]
        rotated = torch.cat((-x_rot[..., rot // 2 :], x_rot[..., : rot // 2]), dim=-1)
        out = x_rot * cos + rotated * sin
        if x_pass.shape[-1]:
            out = torch.cat((out, x_pass), dim=-1)
        return out.to(x.dtype).contiguous()

    return apply(q), apply(k)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q and k: x * cos + rotate_half(x) * sin on the first rot_dim dims.

    q: [batch, heads_q, seq, head_dim]; k: [batch, heads_k, seq, head_dim] (heads_k may differ: GQA).
    cos, sin: [seq, rot_dim] or [batch or 1, seq, rot_dim], rot_dim even and <= head_dim; dims past
    rot_dim pass through unchanged. q and k may be strided views (no copy is made).
    Returns new contiguous (q_rotated, k_rotated), same shapes and dtypes as q and k.
    """
    check_rotary_args(q, k, cos, sin)
    if not runs_triton(q):
        return rotary_reference(q, k, cos, sin)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    launch_rotary(q, k, cos, sin, q_out, k_out)
    return q_out, k_out


def rotary_call(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return rotary(q, k, cos, sin)


rotary_op = custom_op("kernl::rotary", rotary_call, mutates_args=())


@rotary_op.register_fake
def _(q, k, cos, sin):
    # Contiguous like the real outputs, whatever the inputs' strides (empty_like would copy them).
    return q.new_empty(q.shape), k.new_empty(k.shape)
