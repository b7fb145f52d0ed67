"""A row-parallel GEMV whose programs store their slice of the partial rows straight into every rank's places of
the fused sum + norm (_peer_norm_kernel, PUSHED), this rank's own place included, in place of an output tensor.

Each program computes BLOCK_N outputs of every row as gemv_kernel does (gemv_tile), rounds them to the output
dtype (-0.0, the empty mark, sent as +0.0) and posts them to each rank's place of slot `row`, in the half the
slot's use counter picks. The counter is read after the PDL wait: the slot's last call has ended by then.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernl.kernels._gemv import gemv_tile
from kernl.kernels._peer_norm_kernel import _MAX_WORLD, _ROW_CAP_BYTES, _SLOTS, _empty_mask


@triton.jit(do_not_specialize=["rank", "world"])
def gemv_push_kernel(
    X,  # input [M, K], any strides
    W,  # weight [N, K] through (stride_wn, stride_wk)
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    bases,  # int64 [world]: each rank's workspace address
    counters,  # int32 [SLOTS]: this rank's uses of each slot so far
    rank,
    world,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,  # >= M: every row of x in one program
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH_K: tl.constexpr,
):
    acc, _, offs_m, offs_n, _, _ = gemv_tile(
        X, W, W, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, 0, 0, False, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K,
        USE_PDL, PREFETCH_K, True,
    )  # fmt: skip
    dtype = X.dtype.element_ty
    BITS: tl.constexpr = dtype.primitive_bitwidth
    y = acc.to(dtype)
    y = tl.where(_empty_mask(y, BITS), tl.zeros([BLOCK_M, BLOCK_N], dtype=dtype), y)
    in_bounds = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    use = tl.load(counters + offs_m, mask=offs_m < M, other=0)
    slot_bytes = ((use % 2) * _SLOTS + offs_m).to(tl.int64) * (_MAX_WORLD * _ROW_CAP_BYTES)
    offsets = slot_bytes[:, None] + rank * _ROW_CAP_BYTES + offs_n.to(tl.int64)[None, :] * (BITS // 8)
    for peer in range(world):
        tl.store((tl.load(bases + peer) + offsets).to(tl.pointer_type(dtype)), y, mask=in_bounds)
