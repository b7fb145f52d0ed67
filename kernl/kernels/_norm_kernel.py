"""One Triton kernel behind layer_norm and rms_norm: optional residual add, then normalise a row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernl.kernels._pdl import pdl_options, wait_for_inputs


@triton.jit
def norm_kernel(
    X,  # input rows [M, N], last dim contiguous
    R,  # residual rows [M, N] (unused unless HAS_RESIDUAL)
    W,  # weight [N]
    B,  # bias [N] (unused unless HAS_BIAS)
    Y,  # normalised output [M, N]
    S,  # x + residual output [M, N] (unused unless HAS_RESIDUAL)
    stride_x,  # row strides: inputs may be views with padded rows
    stride_r,
    stride_y,
    stride_s,
    N,  # hidden size
    eps,
    weight_offset,  # 0.0 for y * w, 1.0 for the Gemma convention y * (1 + w)
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IS_RMS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_inputs(USE_PDL)
    # One program per row: the whole row sits in registers, so x is read once.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < N
    x = tl.load(X + row * stride_x + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # Add in fp32 and hand the sum back: the next block's residual stream.
        x += tl.load(R + row * stride_r + cols, mask=in_row, other=0.0).to(tl.float32)
        tl.store(S + row * stride_s + cols, x.to(S.dtype.element_ty), mask=in_row)
    if IS_RMS:
        centred = x
    else:
        mean = tl.sum(x, axis=0) / N
        # Zero the tail so padded lanes do not enter the variance.
        centred = tl.where(in_row, x - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32) + weight_offset
    y = centred * rstd * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=in_row)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, last dim] with the last dim contiguous (a view where it can be)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def row_warps(block_n: int) -> int:
    """Warps for one program holding a whole row of block_n elements in registers."""
    return min(max(block_n // 512, 1), 16)


def launch_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    *,
    rms: bool,
    weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the kernel over x viewed as [rows, hidden]; returns (normed, x + residual or None)."""
    n = x.shape[-1]
    x2 = as_rows(x)
    r2 = as_rows(residual) if residual is not None else None
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    y2 = y.view(-1, n)
    s2 = s.view(-1, n) if s is not None else y2
    rows = x2.shape[0]
    if rows == 0:
        return y, s
    block_n = triton.next_power_of_2(n)
    norm_kernel[(rows,)](
        x2,
        r2 if r2 is not None else x2,
        weight,
        bias if bias is not None else weight,
        y2,
        s2,
        x2.stride(0),
        r2.stride(0) if r2 is not None else 0,
        y2.stride(0),
        s2.stride(0),
        n,
        eps,
        weight_offset,
        HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
        IS_RMS=rms,
        BLOCK_N=block_n,
        num_warps=row_warps(block_n),
        **pdl_options(x2),
    )
    return y, s
