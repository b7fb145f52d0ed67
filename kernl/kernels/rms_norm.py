"""RMS norm over the last dim, optionally fused with the residual add before it."""

from __future__ import annotations

import torch

from kernl.kernels._backend import HAS_TRITON, runs_triton
from kernl.kernels._custom_ops import custom_op
from kernl.kernels.layer_norm import check_norm_args

if HAS_TRITON:
    from kernl.kernels._norm_kernel import launch_norm


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
    weight_offset: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: y = total * rsqrt(mean(total^2) + eps) * (weight + weight_offset), in fp32."""
    total = x.float() if residual is None else x.float() + residual.float()
    y = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps) * (weight.float() + weight_offset)
    y = y.to(x.dtype)
    return y if residual is None else (y, total.to(x.dtype))


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
    weight_offset: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMS norm of x (or of x + residual) over its last dim.

    x: [..., hidden]; weight: [hidden]; residual: like x.
    weight_offset: 0.0 multiplies by weight (HF Llama), 1.0 by 1 + weight (Gemma).
    Returns y: like x; with residual, (y, x + residual).
    """
    if weight is None:
        raise ValueError("weight: rms_norm needs a weight tensor")
    check_norm_args(x, weight, None, residual)
    if not runs_triton(x):
        return rms_norm_reference(x, weight, eps, residual=residual, weight_offset=weight_offset)
    y, total = launch_norm(x, weight, None, eps, residual, rms=True, weight_offset=weight_offset)
    return y if residual is None else (y, total)


def rms_norm_call(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    return rms_norm(x, weight, eps, weight_offset=weight_offset)


rms_norm_op = custom_op("kernl::rms_norm", rms_norm_call, mutates_args=())


@rms_norm_op.register_fake
def _(x, weight, eps, weight_offset=0.0):
    return torch.empty_like(x)


def add_rms_norm_call(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm(x, weight, eps, residual=residual, weight_offset=weight_offset)


add_rms_norm_op = custom_op("kernl::add_rms_norm", add_rms_norm_call, mutates_args=())


@add_rms_norm_op.register_fake
def _(x, residual, weight, eps, weight_offset=0.0):
    return torch.empty_like(x), torch.empty_like(x)
