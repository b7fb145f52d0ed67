"""Split-K for linear: when a GEMM has too few output tiles to fill the GPU, split K across programs too.

At small M (BERT at 128 tokens: 12 tiles of 64x128 for N=768) most SMs idle while a few walk all of K.
Split-K gives each (tile, split) program a slice of K and writes its fp32 partial tile to a workspace;
a second kernel sums the partials per element and runs the epilogue. Two launches, no atomics:
deterministic, and CUDA-graph safe (the workspace comes from torch's caching allocator).
"""

from __future__ import annotations

import torch

from kernl.kernels._backend import HAS_TRITON

# SMs of an H100 SXM; the rule only needs the order of magnitude.
_SMS = 132
_SPLITS = (2, 4, 8)
_MAX_CANDIDATES = 4
# Elements per program of the reduction: 8 per thread at 4 warps.
_REDUCE_BLOCK = 1024


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_k_configs(configs: list[dict[str, int]], *, m_bucket: int, n: int, k: int) -> list[dict[str, int]]:
    """Split-K variants of the tile configs that leave most SMs idle: a few extra autotune candidates.

    Only for M buckets up to 256 and K >= 1024: on an H100 no split of K=768 beat the best plain
    tile (M=1 to 256), while K >= 3072 gained 10-35%. A tile config qualifies when its tiles fill at
    most half the SMs; it gets the one split in _SPLITS that brings tiles x splits closest to a full
    wave, with at least 2 BLOCK_K steps per split.
    """
    if m_bucket > 256 or k < 1024:
        return []
    variants = []
    for config in configs:
        tiles = _cdiv(m_bucket, config["BLOCK_M"]) * _cdiv(n, config["BLOCK_N"])
        splits = [s for s in _SPLITS if _cdiv(k, config["BLOCK_K"]) >= 2 * s]
        if 2 * tiles > _SMS or not splits:
            continue
        split = min(splits, key=lambda s: abs(tiles * s - _SMS))  # ties: the smaller split
        variants.append({**config, "SPLIT_K": split})
        if len(variants) == _MAX_CANDIDATES:
            break
    return variants


if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernl.kernels._gemm import accumulate_k_range, apply_activation, grouped_tile
    from kernl.kernels._pdl import pdl_options, prefetch_span, prefetch_weight_l2, wait_for_inputs

    @triton.jit
    def split_k_partial_kernel(
        X,  # input [M, K], any strides
        W,  # weight, read as [N, K] through (stride_wn, stride_wk)
        P,  # workspace [SPLIT_K, M, N] fp32, contiguous: one partial product per split
        M,
        N,
        K,
        K_PER,  # K range per split, a multiple of BLOCK_K
        stride_xm,
        stride_xk,
        stride_wn,
        stride_wk,
        stride_ps,
        stride_pm,
        INPUT_PRECISION: tl.constexpr,
        EVEN_K: tl.constexpr,  # SPLIT_K * K_PER == K: every split's range is full, no K mask
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        USE_PDL: tl.constexpr,
        PREFETCH_K: tl.constexpr,  # > 0: pull this much of the split's K range into L2 before waiting
        W_K_CONTIGUOUS: tl.constexpr,
    ):
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        split = tl.program_id(1)
        k_lo = split * K_PER
        if PREFETCH_K > 0:
            w_split = W + k_lo.to(tl.int64) * stride_wk
            prefetch_weight_l2(
                w_split, pid_n * BLOCK_N, N, K - k_lo, stride_wn, stride_wk, PREFETCH_K, BLOCK_N, W_K_CONTIGUOUS
            )
        wait_for_inputs(USE_PDL)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # As in linear_kernel: wrapped rows and columns keep the loads unmasked, the store drops them.
        rows = (offs_m % M).to(tl.int64)
        cols = (offs_n % N).to(tl.int64)
        k_lo64 = k_lo.to(tl.int64)
        x_ptrs = X + rows[:, None] * stride_xm + (k_lo64 + offs_k[None, :]) * stride_xk
        w_ptrs = W + (k_lo64 + offs_k[:, None]) * stride_wk + cols[None, :] * stride_wn
        # The same trip count for every split; past K (the last split's tail, or an empty split) the
        # masked loads give zeros, so each split still writes its whole tile: no zero-filled workspace.
        acc = accumulate_k_range(
            x_ptrs, w_ptrs, stride_xk, stride_wk, K_PER, K - k_lo, INPUT_PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K
        )
        out = P + split.to(tl.int64) * stride_ps + offs_m.to(tl.int64)[:, None] * stride_pm + offs_n[None, :]
        tl.store(out, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    @triton.jit
    def split_k_reduce_kernel(
        P,  # workspace [SPLIT_K, M, N] fp32, contiguous
        B,  # bias [N] (unused unless HAS_BIAS)
        R,  # residual [M, N] (unused unless HAS_RESIDUAL)
        Y,  # output [M, N]
        M,
        N,
        stride_ps,
        stride_rm,
        stride_rn,
        stride_ym,
        stride_yn,
        ACTIVATION: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        SPLIT_K: tl.constexpr,
        BLOCK: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        wait_for_inputs(USE_PDL)
        # Flat over the [M, N] workspace: contiguous, vectorised loads of every partial.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M * N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):  # a fixed order: the same sum on every run
            acc += tl.load(P + s * stride_ps + offs, mask=mask, other=0.0)
        rows = offs // N
        cols = offs % N
        # The epilogue of linear_kernel, in the same order: bias, activation, residual.
        if HAS_BIAS:
            acc += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        acc = apply_activation(acc, ACTIVATION)
        if HAS_RESIDUAL:
            acc += tl.load(R + rows * stride_rm + cols * stride_rn, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + rows * stride_ym + cols * stride_yn, acc.to(Y.dtype.element_ty), mask=mask)

    def launch_split_k(
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
        """y2 = act(x2 @ W^T + bias) + r2 with K split config["SPLIT_K"] ways; W read through its strides."""
        m, k = x2.shape
        n = y2.shape[1]
        split_k, block_k = config["SPLIT_K"], config["BLOCK_K"]
        k_per = _cdiv(_cdiv(k, block_k), split_k) * block_k
        # Every split writes its whole tile, so no zero-fill; under graph capture this is the graph's pool.
        pdl = pdl_options(x2)
        partials = torch.empty((split_k, m, n), dtype=torch.float32, device=x2.device)
        grid = (_cdiv(m, config["BLOCK_M"]) * _cdiv(n, config["BLOCK_N"]), split_k)
        split_k_partial_kernel[grid](
            x2,
            weight,
            partials,
            m,
            n,
            k,
            k_per,
            x2.stride(0),
            x2.stride(1),
            stride_wn,
            stride_wk,
            partials.stride(0),
            partials.stride(1),
            INPUT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
            EVEN_K=k_per * split_k == k,
            BLOCK_M=config["BLOCK_M"],
            BLOCK_N=config["BLOCK_N"],
            BLOCK_K=block_k,
            GROUP_M=config["GROUP_M"],
            num_warps=config["num_warps"],
            num_stages=config["num_stages"],
            **pdl,
            PREFETCH_K=prefetch_span(pdl, m, k_per),
            W_K_CONTIGUOUS=stride_wk == 1,
        )
        split_k_reduce_kernel[(_cdiv(m * n, _REDUCE_BLOCK),)](
            partials,
            bias if bias is not None else y2,
            r2 if r2 is not None else y2,
            y2,
            m,
            n,
            partials.stride(0),
            r2.stride(0) if r2 is not None else 0,
            r2.stride(1) if r2 is not None else 0,
            y2.stride(0),
            y2.stride(1),
            ACTIVATION=activation,
            HAS_BIAS=bias is not None,
            HAS_RESIDUAL=r2 is not None,
            SPLIT_K=split_k,
            BLOCK=_REDUCE_BLOCK,
            num_warps=4,
            **pdl,
        )
