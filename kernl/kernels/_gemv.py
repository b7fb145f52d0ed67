"""GEMV for decode: linear and gated linear of one row (batch-1 decode steps).

At small M a linear is one read of its weight, and the speed is how many bytes are in flight. The tile
kernels pad M to 16 and stage the weight through shared memory for tl.dot; here each program owns BLOCK_N
weight rows and streams [BLOCK_N, BLOCK_K] slabs of them straight into registers (K contiguous: wide,
coalesced loads), multiplying with fp32 FMAs into a [BLOCK_M, BLOCK_N, BLOCK_K] accumulator that is summed
over K once, at the end. Rows are independent, so small BLOCK_N gives every SM work without splitting K:
one launch, no workspace, the same sum order on every run. These configs compete in the autotuner with
the tile, split-K and cuBLAS candidates; it keeps them only where they are faster.
"""

from __future__ import annotations

import os

import torch

from kernl.kernels._backend import HAS_TRITON
from kernl.kernels._gemm import _next_pow2

# The config key that selects this kernel.
GEMV = "GEMV"
# Off with KERNL_GEMV=0: an A/B switch for benchmarks; bundles keep the decisions they were tuned with.
ENABLED = os.environ.get("KERNL_GEMV", "1") != "0"
# The kernel takes any BLOCK_M >= M, but the tuner offers it at M=1 only: at M=4 the tile kernels won on an H200.
MAX_M = 1
# (BLOCK_N, BLOCK_K, num_warps), best guess first: 8-32 KB of weight in flight per program and step. In a
# graph of cold decode-shape GEMVs on an H200, 8 x 1024 beat cuBLAS and the tile kernels at every Llama shape.
_TABLE = ((8, 1024, 4), (16, 512, 4), (4, 2048, 4), (4, 1024, 4), (32, 256, 4))
# fp32 accumulator values a thread may hold (the product tile lives in registers too).
_MAX_ACC_PER_THREAD = 64


def gemv_configs(m_bucket: int, n: int, k: int, *, weight_tiles: int = 1) -> list[dict[str, int]]:
    """GEMV candidates for an M bucket of at most MAX_M rows (none above, or when switched off).

    Blocks are clamped to the problem; warps double (up to 8) until each thread holds at most
    _MAX_ACC_PER_THREAD accumulator values per weight, else BLOCK_K halves.
    """
    if not ENABLED or m_bucket > MAX_M:
        return []
    configs: list[dict[str, int]] = []
    for block_n, block_k, warps in _TABLE:
        block_n = min(block_n, _next_pow2(n))
        block_k = min(block_k, max(16, _next_pow2(k)))
        while warps < 8 and weight_tiles * m_bucket * block_n * block_k > _MAX_ACC_PER_THREAD * 32 * warps:
            warps *= 2
        while block_k > 16 and weight_tiles * m_bucket * block_n * block_k > _MAX_ACC_PER_THREAD * 32 * warps:
            block_k //= 2
        config = {GEMV: 1, "BLOCK_M": m_bucket, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps}
        if config not in configs:
            configs.append(config)
    return configs


if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernl.kernels._gemm import apply_activation
    from kernl.kernels._pdl import pdl_options, prefetch_span, prefetch_weight_l2, wait_for_inputs

    @triton.jit
    def _rows_times_x(
        X,
        WA,
        WB,  # a second weight read in the same loop (unused unless TWO)
        rows,  # [BLOCK_M] int64 row indices of x (wrapped into range)
        cols,  # [BLOCK_N] int64 weight rows (wrapped into range)
        K,
        stride_xm,
        stride_xk,
        stride_an,
        stride_ak,
        stride_bn,
        stride_bk,
        TWO: tl.constexpr,
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """x[rows] @ WA[cols]^T (and WB's) as fp32 [BLOCK_M, BLOCK_N] tiles: FMAs in the loop, one sum over K.

        Both weights' slabs are loaded in the same step, so a gated pair keeps twice the bytes in flight."""
        offs_k = tl.arange(0, BLOCK_K)[None, None, :]
        x_ptrs = X + rows[:, None, None] * stride_xm + offs_k * stride_xk
        a_ptrs = WA + cols[None, :, None] * stride_an + offs_k * stride_ak
        b_ptrs = WB + cols[None, :, None] * stride_bn + offs_k * stride_bk
        acc_a = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32) if TWO else acc_a
        for k_start in range(0, K, BLOCK_K):
            k_in = offs_k < K - k_start
            x = tl.load(x_ptrs) if EVEN_K else tl.load(x_ptrs, mask=k_in, other=0.0)
            a = tl.load(a_ptrs) if EVEN_K else tl.load(a_ptrs, mask=k_in, other=0.0)
            acc_a += x.to(tl.float32) * a.to(tl.float32)
            if TWO:
                b = tl.load(b_ptrs) if EVEN_K else tl.load(b_ptrs, mask=k_in, other=0.0)
                acc_b += x.to(tl.float32) * b.to(tl.float32)
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        return tl.sum(acc_a, axis=2), tl.sum(acc_b, axis=2)

    @triton.jit
    def gemv_tile(
        X,
        WA,
        WB,  # a second weight read in the same loop (unused unless TWO)
        M,
        N,
        K,
        stride_xm,
        stride_xk,
        stride_an,
        stride_ak,
        stride_bn,
        stride_bk,
        TWO: tl.constexpr,
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        USE_PDL: tl.constexpr,
        PREFETCH_K: tl.constexpr,
        W_K_CONTIGUOUS: tl.constexpr,
    ):
        """This program's fp32 [BLOCK_M, BLOCK_N] tiles of x @ WA^T (and WB's), their weight rows prefetched before
        the PDL wait; with the tiles' row and column offsets, and those wrapped into range (int64)."""
        n0 = tl.program_id(0) * BLOCK_N
        if PREFETCH_K > 0:
            prefetch_weight_l2(WA, n0, N, K, stride_an, stride_ak, PREFETCH_K, BLOCK_N, W_K_CONTIGUOUS)
            if TWO:
                prefetch_weight_l2(WB, n0, N, K, stride_bn, stride_bk, PREFETCH_K, BLOCK_N, W_K_CONTIGUOUS)
        wait_for_inputs(USE_PDL)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        # Wrapped rows and columns keep the loads unmasked; the store drops them.
        rows = (offs_m % M).to(tl.int64)
        cols = (offs_n % N).to(tl.int64)
        a, b = _rows_times_x(
            X, WA, WB, rows, cols, K, stride_xm, stride_xk, stride_an, stride_ak, stride_bn, stride_bk, TWO, EVEN_K,
            BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        return a, b, offs_m, offs_n, rows, cols

    @triton.jit
    def gemv_kernel(
        X,  # input [M, K], any strides
        W,  # weight, read as [N, K] through (stride_wn, stride_wk)
        B,  # bias [N] (unused unless HAS_BIAS)
        R,  # residual [M, N] (unused unless HAS_RESIDUAL)
        Y,  # output [M, N]
        M,
        N,
        K,
        stride_xm,
        stride_xk,
        stride_wn,
        stride_wk,
        stride_rm,
        stride_rn,
        stride_ym,
        stride_yn,
        ACTIVATION: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr,  # >= M: every row of x in one program
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        USE_PDL: tl.constexpr,
        PREFETCH_K: tl.constexpr,
        W_K_CONTIGUOUS: tl.constexpr,
    ):
        y, _, offs_m, offs_n, rows, cols = gemv_tile(
            X, W, W, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, 0, 0, False, EVEN_K, BLOCK_M, BLOCK_N,
            BLOCK_K, USE_PDL, PREFETCH_K, W_K_CONTIGUOUS,
        )  # fmt: skip
        # linear_kernel's epilogue, in its order: bias, activation, residual.
        if HAS_BIAS:
            y += tl.load(B + cols)[None, :].to(tl.float32)
        y = apply_activation(y, ACTIVATION)
        if HAS_RESIDUAL:
            y += tl.load(R + rows[:, None] * stride_rm + cols[None, :] * stride_rn).to(tl.float32)
        out = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
        tl.store(out, y.to(Y.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    @triton.jit
    def gated_gemv_kernel(
        X,  # input [M, K], any strides
        WG,  # gate weight, read as [N, K] through its strides
        WU,  # up weight, read as [N, K] through its strides
        Y,  # output [M, N]
        M,
        N,
        K,
        stride_xm,
        stride_xk,
        stride_gn,
        stride_gk,
        stride_un,
        stride_uk,
        stride_ym,
        stride_yn,
        ACTIVATION: tl.constexpr,  # applied to the gate product only
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        USE_PDL: tl.constexpr,
        PREFETCH_K: tl.constexpr,  # > 0 only where both weights are K-contiguous
    ):
        g, u, offs_m, offs_n, _, _ = gemv_tile(
            X, WG, WU, M, N, K, stride_xm, stride_xk, stride_gn, stride_gk, stride_un, stride_uk, True, EVEN_K,
            BLOCK_M, BLOCK_N, BLOCK_K, USE_PDL, PREFETCH_K, True,
        )  # fmt: skip
        y = apply_activation(g, ACTIVATION) * u
        out = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
        tl.store(out, y.to(Y.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    def gemv_launch_options(config: dict[str, int], k: int, pdl: dict[str, bool], prefetch_k: int) -> dict:
        """The launch keywords every GEMV kernel takes from its tuned config, PDL and its prefetch span."""
        return {
            "EVEN_K": k % config["BLOCK_K"] == 0,
            "BLOCK_M": config["BLOCK_M"],
            "BLOCK_N": config["BLOCK_N"],
            "BLOCK_K": config["BLOCK_K"],
            "num_warps": config["num_warps"],
            "num_stages": 1,
            **pdl,
            "PREFETCH_K": prefetch_k,
        }

    def launch_gemv(
        x2: torch.Tensor,
        weight: torch.Tensor,
        stride_wn: int,
        stride_wk: int,
        bias: torch.Tensor | None,
        r2: torch.Tensor | None,
        y2: torch.Tensor,
        activation: str,
        config: dict[str, int],
    ) -> None:
        """y2 = act(x2 @ W^T + bias) + r2 for M <= config["BLOCK_M"]; W read through its strides."""
        m, k = x2.shape
        n = y2.shape[1]
        pdl = pdl_options(x2)
        gemv_kernel[(-(-n // config["BLOCK_N"]),)](
            x2,
            weight,
            bias if bias is not None else y2,
            r2 if r2 is not None else y2,
            y2,
            m,
            n,
            k,
            x2.stride(0),
            x2.stride(1),
            stride_wn,
            stride_wk,
            r2.stride(0) if r2 is not None else 0,
            r2.stride(1) if r2 is not None else 0,
            y2.stride(0),
            y2.stride(1),
            ACTIVATION=activation,
            HAS_BIAS=bias is not None,
            HAS_RESIDUAL=r2 is not None,
            W_K_CONTIGUOUS=stride_wk == 1,
            **gemv_launch_options(config, k, pdl, prefetch_span(pdl, m, k)),
        )

    def launch_gated_gemv(
        x2: torch.Tensor,
        weight_gate: torch.Tensor,
        weight_up: torch.Tensor,
        y2: torch.Tensor,
        activation: str,
        config: dict[str, int],
    ) -> None:
        """y2 = act(x2 @ Wg^T) * (x2 @ Wu^T) for M <= config["BLOCK_M"]; weights read through their strides."""
        m, k = x2.shape
        n = y2.shape[1]
        pdl = pdl_options(x2)
        k_rows = weight_gate.stride(1) == 1 and weight_up.stride(1) == 1
        gated_gemv_kernel[(-(-n // config["BLOCK_N"]),)](
            x2,
            weight_gate,
            weight_up,
            y2,
            m,
            n,
            k,
            x2.stride(0),
            x2.stride(1),
            weight_gate.stride(0),
            weight_gate.stride(1),
            weight_up.stride(0),
            weight_up.stride(1),
            y2.stride(0),
            y2.stride(1),
            ACTIVATION=activation,
            **gemv_launch_options(config, k, pdl, prefetch_span(pdl, m, k) if k_rows else 0),
        )
