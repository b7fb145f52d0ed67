"""Layer norm over the last dim, optionally fused with the residual add before it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernl.kernels._backend import HAS_TRITON, check_tensor, runs_triton
from kernl.kernels._custom_ops import custom_op

if HAS_TRITON:
    from kernl.kernels._norm_kernel import launch_norm

MAX_HIDDEN = 16384


def check_norm_args(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, residual) -> None:
    """Shared checks of layer_norm and rms_norm; raises a ValueError naming the argument."""
    check_tensor("x", x)
    if x.dim() < 1 or not 1 <= x.shape[-1] <= MAX_HIDDEN:
        raise ValueError(f"x: hidden size (last dim) must be in 1..{MAX_HIDDEN}, got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(name, t, ndim=1)
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, but x is on {x.device}")
        if t.shape[0] != x.shape[-1]:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match hidden size {x.shape[-1]}")
    if residual is not None:
        check_tensor("residual", residual, like=x)
        if residual.shape != x.shape:
            raise ValueError(f"residual: shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}")


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: y = layer_norm(x + residual) in fp32, cast back; with residual also returns the sum."""
    total = x.float() if residual is None else x.float() + residual.float()
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    y = F.layer_norm(total, (x.shape[-1],), w, b, eps).to(x.dtype)
    return y if residual is None else (y, total.to(x.dtype))


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Layer norm of x (or of x + residual) over its last dim.

    x: [..., hidden]; weight, bias: [hidden] or None; residual: like x.
    Returns y: like x; with residual, (y, x + residual) so the residual stream needs no extra kernel.
    """
    check_norm_args(x, weight, bias, residual)
    if not runs_triton(x):
        return layer_norm_reference(x, weight, bias, eps, residual=residual)
    if weight is None:
        weight = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    y, total = launch_norm(x, weight, bias, eps, residual, rms=False)
    return y if residual is None else (y, total)


def layer_norm_call(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    return layer_norm(x, weight, bias, eps)


layer_norm_op = custom_op("kernl::layer_norm", layer_norm_call, mutates_args=())


@layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x)


def add_layer_norm_call(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return layer_norm(x, weight, bias, eps, residual=residual)


add_layer_norm_op = custom_op("kernl::add_layer_norm", add_layer_norm_call, mutates_args=())


@add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    return torch.empty_like(x), torch.empty_like(x)
