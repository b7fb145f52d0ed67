"""y = act(x @ weight_gate.T) * (x @ weight_up.T) (SwiGLU, GeGLU) as one Triton GEMM with two accumulators."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernl.kernels import autotune_cache
from kernl.kernels._backend import HAS_TRITON, check_tensor, runs_triton
from kernl.kernels._custom_ops import custom_op
from kernl.kernels._gemm import check_activation, fit_configs, torch_activation
from kernl.kernels._gemv import GEMV, gemv_configs

# Candidate (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per M bucket, best guess first.
# Two fp32 accumulators and two weight tiles per stage: tiles are a size smaller than linear's at
# large M, so that registers and shared memory still fit.
_CONFIGS_BY_M = (
    (16, [(16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 32, 256, 4, 3), (16, 64, 64, 4, 4)]),
    (64, [(32, 64, 128, 4, 3), (64, 64, 64, 4, 4), (32, 32, 128, 4, 4), (64, 128, 64, 8, 3)]),
    (1024, [(64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 32, 4, 4)]),
    (None, [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 3), (256, 64, 64, 8, 3)]),
)  # fmt: skip


@functools.cache
def gated_linear_configs(m_bucket: int, n: int, k: int, elem_size: int) -> list[dict[str, int]]:
    """The configs the autotuner tries for one problem class; the first is the untuned default.

    M=1 gets the GEMV configs alone (see linear_configs)."""
    gemv = gemv_configs(m_bucket, n, k, weight_tiles=2)
    if gemv:
        return gemv
    table = next(rows for limit, rows in _CONFIGS_BY_M if limit is None or m_bucket <= limit)
    if m_bucket <= 16 and n > 2048:
        # Enough 64-wide column tiles to fill the GPU: prefer them over the 32-wide default.
        table = [table[1], table[0], *table[2:]]
    return fit_configs(table, m_bucket=m_bucket, n=n, k=k, elem_size=elem_size, weight_tiles=2)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernl.kernels._gemm import apply_activation, grouped_tile
    from kernl.kernels._gemv import launch_gated_gemv
    from kernl.kernels._pdl import pdl_options, prefetch_span, prefetch_weight_l2, wait_for_inputs

    @triton.jit
    def gated_linear_kernel(
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
        INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs: exact products, no silent TF32
        EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: the K loop needs no mask
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,  # row blocks per launch group, for L2 reuse of weight tiles
        USE_PDL: tl.constexpr,
        PREFETCH_K: tl.constexpr,  # > 0: pull this much of both weights' K into L2 before waiting
    ):
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if PREFETCH_K > 0:
            prefetch_weight_l2(WG, pid_n * BLOCK_N, N, K, stride_gn, stride_gk, PREFETCH_K, BLOCK_N, True)
            prefetch_weight_l2(WU, pid_n * BLOCK_N, N, K, stride_un, stride_uk, PREFETCH_K, BLOCK_N, True)
        wait_for_inputs(USE_PDL)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Out-of-range rows and columns wrap into range: unmasked loads, the store drops them.
        rows = (offs_m % M).to(tl.int64)
        cols = (offs_n % N).to(tl.int64)
        x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        g_ptrs = WG + offs_k[:, None] * stride_gk + cols[None, :] * stride_gn
        u_ptrs = WU + offs_k[:, None] * stride_uk + cols[None, :] * stride_un
        # Both products of the same output tile, in fp32; neither is ever written to memory.
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs)
                g = tl.load(g_ptrs)
                u = tl.load(u_ptrs)
            else:
                k_left = K - k_start
                x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                g = tl.load(g_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
                u = tl.load(u_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            # One x tile feeds both dots: x is read once for the pair.
            acc_g = tl.dot(x, g, acc=acc_g, input_precision=INPUT_PRECISION)
            acc_u = tl.dot(x, u, acc=acc_u, input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            g_ptrs += BLOCK_K * stride_gk
            u_ptrs += BLOCK_K * stride_uk
        y = apply_activation(acc_g, ACTIVATION) * acc_u
        out_rows = offs_m.to(tl.int64)[:, None]
        in_bounds = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(Y + out_rows * stride_ym + offs_n[None, :] * stride_yn, y.to(Y.dtype.element_ty), mask=in_bounds)

    def launch_gated_linear(
        x2: torch.Tensor, weight_gate: torch.Tensor, weight_up: torch.Tensor, y2: torch.Tensor, activation: str
    ) -> None:
        """Fill y2 [M, N] from x2 [M, K]; picks (or tunes, once per key) the tile config."""
        m, k = x2.shape
        n = y2.shape[1]
        key = (autotune_cache.dtype_name(x2.dtype), autotune_cache.bucket_m(m), n, k, activation)
        pdl = pdl_options(x2)
        # The prefetch reads the weights as [N, K] rows: only where K is their contiguous dim.
        k_rows = weight_gate.stride(1) == 1 and weight_up.stride(1) == 1
        prefetch = prefetch_span(pdl, m, k) if k_rows else 0

        def run(config: dict[str, int], operands: tuple[torch.Tensor, ...] = (weight_gate, weight_up)) -> None:
            gate, up = operands
            if config.get(GEMV):
                launch_gated_gemv(x2, gate, up, y2, activation, config)
                return
            # One program per output tile (plain ints: triton.cdiv costs microseconds per launch).
            grid = (-(-m // config["BLOCK_M"]) * -(-n // config["BLOCK_N"]),)
            gated_linear_kernel[grid](
                x2,
                gate,
                up,
                y2,
                m,
                n,
                k,
                x2.stride(0),
                x2.stride(1),
                gate.stride(0),
                gate.stride(1),
                up.stride(0),
                up.stride(1),
                y2.stride(0),
                y2.stride(1),
                ACTIVATION=activation,
                INPUT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
                EVEN_K=k % config["BLOCK_K"] == 0,
                **config,
                **pdl,
                PREFETCH_K=prefetch,
            )

        candidates = gated_linear_configs(key[1], n, k, x2.element_size())
        # Few rows: the call is a stream of its weights, timed as a decode step runs it.
        weights = (weight_gate, weight_up)
        streamed = autotune_cache.Streamed(weights, run) if key[1] <= autotune_cache.STREAMED_M else None
        run(autotune_cache.tune("gated_linear", key, candidates, run, benchmark=x2.is_cuda, streamed=streamed))


def check_gated_linear_args(
    x: torch.Tensor, weight_gate: torch.Tensor, weight_up: torch.Tensor, activation: str
) -> None:
    """Raise a ValueError naming the first bad argument of gated_linear()."""
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least rank 1 ([..., hidden]), got shape {tuple(x.shape)}")
    check_tensor("weight_gate", weight_gate, ndim=2, like=x)
    if weight_gate.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight_gate: shape {tuple(weight_gate.shape)} read as [inter, hidden] does not match x's hidden "
            f"size {x.shape[-1]}"
        )
    check_tensor("weight_up", weight_up, ndim=2, like=x)
    if weight_up.shape != weight_gate.shape:
        raise ValueError(
            f"weight_up: shape {tuple(weight_up.shape)} differs from weight_gate's {tuple(weight_gate.shape)}"
        )
    check_activation(activation, allow_none=False)


def gated_linear_reference(
    x: torch.Tensor, weight_gate: torch.Tensor, weight_up: torch.Tensor, *, activation: str = "silu"
) -> torch.Tensor:
    """Plain torch: act(x @ weight_gate.T) * (x @ weight_up.T) in fp32, cast back to x's dtype."""
    xf = x.float()
    y = torch_activation(F.linear(xf, weight_gate.float()), activation) * F.linear(xf, weight_up.float())
    return y.to(x.dtype)


def gated_linear(
    x: torch.Tensor, weight_gate: torch.Tensor, weight_up: torch.Tensor, *, activation: str = "silu"
) -> torch.Tensor:
    """The gated MLP's first half in one kernel: act(x @ weight_gate.T) * (x @ weight_up.T).

    x: [..., hidden]; weight_gate, weight_up: [inter, hidden]; activation: "silu" (SwiGLU),
    "gelu" or "gelu_tanh" (GeGLU), "relu" or "tanh". Returns y: [..., inter] in x's dtype.
    fp32 inputs multiply in full fp32 ("ieee"), never TF32.
    """
    check_gated_linear_args(x, weight_gate, weight_up, activation)
    if not runs_triton(x):
        return gated_linear_reference(x, weight_gate, weight_up, activation=activation)
    k, n = x.shape[-1], weight_gate.shape[0]
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    launch_gated_linear(x2, weight_gate, weight_up, y.view(-1, n), activation)
    return y


def gated_linear_call(
    x: torch.Tensor, weight_gate: torch.Tensor, weight_up: torch.Tensor, activation: str
) -> torch.Tensor:
    return gated_linear(x, weight_gate, weight_up, activation=activation)


gated_linear_op = custom_op("kernl::gated_linear", gated_linear_call, mutates_args=())


@gated_linear_op.register_fake
def _(x, weight_gate, weight_up, activation):
    return x.new_empty((*x.shape[:-1], weight_gate.shape[0]))
