"""y = act(x @ weight.T + bias) + residual as one Triton GEMM: bias, activation and residual in its epilogue."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernl.kernels import autotune_cache
from kernl.kernels._backend import HAS_TRITON, check_tensor, runs_triton
from kernl.kernels._custom_ops import custom_op
from kernl.kernels._gemm import check_activation, fit_configs, torch_activation
from kernl.kernels._gemv import GEMV, gemv_configs
from kernl.kernels._split_k import split_k_configs

# The config key that selects cuBLAS instead of a Triton tile config.
CUBLAS = "CUBLAS"

# Candidate (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per M bucket, best guess first.
# Small M streams the weight: wide-K tiles, and narrow N tiles so that even N=768 makes enough
# programs to keep every SM loading. Mid M needs small tiles too (M=128, N=768 is 12 programs of
# 64x128). Large M is compute bound: the big wgmma tiles of Triton's matmul tutorial.
_CONFIGS_BY_M = (
    (16, [(16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 32, 256, 4, 3),
          (16, 64, 256, 4, 3), (16, 128, 128, 4, 3), (16, 16, 256, 2, 4)]),
    (64, [(32, 64, 128, 4, 4), (64, 64, 64, 4, 4), (32, 128, 64, 4, 4),
          (64, 128, 64, 4, 4), (32, 32, 128, 4, 4), (32, 16, 256, 2, 3)]),
    (256, [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4),
           (128, 64, 64, 4, 4), (32, 64, 128, 4, 4), (32, 32, 128, 4, 4)]),
    (1024, [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
            (128, 256, 64, 8, 3), (64, 64, 64, 4, 4), (32, 64, 128, 4, 4)]),
    (None, [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
            (128, 128, 32, 4, 4), (64, 256, 32, 4, 4), (128, 64, 64, 4, 4)]),
)  # fmt: skip


@functools.cache
def linear_configs(
    m_bucket: int, n: int, k: int, elem_size: int, heavy_epilogue: bool, weight_transposed: bool = False
) -> list[dict[str, int]]:
    """The configs the autotuner tries for one problem class; the first is the untuned default.

    heavy_epilogue: an activation or a residual; its temporaries need registers, so the accumulator
    gets half as many per thread (more warps, or the config goes).
    Split-K variants (a SPLIT_K key) follow the plain configs where few tiles would leave SMs idle.
    M=1 over a [N, K] weight gets the GEMV configs alone: in a graph of cold decode-shape
    linears (benchmarks/decode_linears.py) they beat every tile, split-K and cuBLAS candidate, which win
    only the tuner's isolated timings, where no previous kernel's tail overlaps their start.
    """
    gemv = [] if weight_transposed else gemv_configs(m_bucket, n, k)
    if gemv:
        return gemv
    table = next(rows for limit, rows in _CONFIGS_BY_M if limit is None or m_bucket <= limit)
    if m_bucket <= 16 and n > 2048:
        # Enough 64-wide column tiles to fill the GPU: prefer them over the 32-wide default.
        table = [table[1], table[0], *table[2:]]
    max_acc = 64 if heavy_epilogue else 128
    configs = fit_configs(table, m_bucket=m_bucket, n=n, k=k, elem_size=elem_size, max_acc_per_thread=max_acc)
    # cuBLAS (with the epilogue as torch ops) competes too: at large M its TMA/wgmma GEMM is ahead of
    # this kernel, and the tuner keeps it only where it is faster. Half precision only: kernl never
    # lets fp32 run as TF32, which cuBLAS may under torch's global matmul settings.
    cublas = [{CUBLAS: 1}] if elem_size == 2 else []
    return configs + split_k_configs(configs, m_bucket=m_bucket, n=n, k=k) + cublas


if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernl.kernels._gemm import accumulate_k_range, apply_activation, grouped_tile
    from kernl.kernels._gemv import launch_gemv
    from kernl.kernels._pdl import pdl_options, prefetch_span, prefetch_weight_l2, wait_for_inputs
    from kernl.kernels._split_k import launch_split_k

    @triton.jit
    def linear_kernel(
        X,  # input [M, K], any strides: a row-strided view needs no copy
        W,  # weight, read as [N, K] through (stride_wn, stride_wk); Conv1D's [K, N] just swaps them
        B,  # bias [N], contiguous (unused unless HAS_BIAS)
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
        ACTIVATION: tl.constexpr,  # "none" or a name from _gemm.ACTIVATIONS, applied after the bias
        HAS_BIAS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs: exact products, no silent TF32
        EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: the K loop needs no mask
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,  # row blocks per launch group, for L2 reuse of weight tiles
        USE_PDL: tl.constexpr,
        PREFETCH_K: tl.constexpr,  # > 0: pull this much of the weight's K into L2 before waiting
        W_K_CONTIGUOUS: tl.constexpr,
    ):
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if PREFETCH_K > 0:
            prefetch_weight_l2(W, pid_n * BLOCK_N, N, K, stride_wn, stride_wk, PREFETCH_K, BLOCK_N, W_K_CONTIGUOUS)
        wait_for_inputs(USE_PDL)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Rows and columns past the edge wrap back into range, so the loop's loads need no M/N mask
        # (and stay vectorised); the store drops them. int64: M * K can pass 2**31 (lm_head, long batches).
        rows = (offs_m % M).to(tl.int64)
        cols = (offs_n % N).to(tl.int64)
        x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = W + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
        # All of K, masked past it unless EVEN_K; fp32 accumulator whatever the input dtype.
        acc = accumulate_k_range(
            x_ptrs, w_ptrs, stride_xk, stride_wk, K, K, INPUT_PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K
        )
        # Epilogue on the fp32 tile in registers: the product never goes to memory un-finished.
        if HAS_BIAS:
            acc += tl.load(B + cols).to(tl.float32)[None, :]
        acc = apply_activation(acc, ACTIVATION)
        out_rows = offs_m.to(tl.int64)[:, None]
        in_bounds = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if HAS_RESIDUAL:
            r = tl.load(R + out_rows * stride_rm + offs_n[None, :] * stride_rn, mask=in_bounds, other=0.0)
            acc += r.to(tl.float32)
        tl.store(Y + out_rows * stride_ym + offs_n[None, :] * stride_yn, acc.to(Y.dtype.element_ty), mask=in_bounds)

    def launch_linear(
        x2: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        r2: torch.Tensor | None,
        y2: torch.Tensor,
        activation: str | None,
        weight_transposed: bool,
    ) -> None:
        """Fill y2 [M, N] from x2 [M, K]; picks (or tunes, once per key) the tile config."""
        config, run = linear_plan(x2, weight, bias, r2, y2, activation, weight_transposed)
        run(config)

    def linear_plan(
        x2: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        r2: torch.Tensor | None,
        y2: torch.Tensor,
        activation: str | None,
        weight_transposed: bool,
    ) -> tuple[dict[str, int], Callable[[dict[str, int]], None]]:
        """The config launch_linear runs (tuned at the first call of its key) and the function that runs one."""
        m, k = x2.shape
        n = y2.shape[1]
        if weight_transposed:
            # Conv1D's [in, out] weight, read as [out, in] by swapping its strides: no copy.
            stride_wk, stride_wn = weight.stride()
        else:
            stride_wn, stride_wk = weight.stride()
        act = activation or "none"
        key = (
            autotune_cache.dtype_name(x2.dtype),
            autotune_cache.bucket_m(m),
            n,
            k,
            act,
            bias is not None,
            r2 is not None,
            weight_transposed,
        )
        pdl = pdl_options(x2)
        prefetch = {"PREFETCH_K": prefetch_span(pdl, m, k), "W_K_CONTIGUOUS": stride_wk == 1}

        def run(config: dict[str, int], operands: tuple[torch.Tensor, ...] = (weight,)) -> None:
            (w,) = operands
            if config.get(CUBLAS):
                cublas_linear(x2, w, weight_transposed, bias, r2, y2, act)
                return
            if config.get("SPLIT_K", 1) > 1:
                launch_split_k(x2, w, stride_wn, stride_wk, bias, r2, y2, act, config)
                return
            if config.get(GEMV):
                launch_gemv(x2, w, stride_wn, stride_wk, bias, r2, y2, act, config)
                return
            if "SPLIT_K" in config:  # SPLIT_K=1 is the plain kernel, which takes no such argument
                config = {name: value for name, value in config.items() if name != "SPLIT_K"}
            # One program per output tile (plain ints: triton.cdiv costs microseconds per launch).
            grid = (-(-m // config["BLOCK_M"]) * -(-n // config["BLOCK_N"]),)
            linear_kernel[grid](
                x2,
                w,
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
                ACTIVATION=act,
                HAS_BIAS=bias is not None,
                HAS_RESIDUAL=r2 is not None,
                INPUT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
                EVEN_K=k % config["BLOCK_K"] == 0,
                **config,
                **pdl,
                **prefetch,
            )

        heavy_epilogue = act != "none" or r2 is not None
        candidates = linear_configs(key[1], n, k, x2.element_size(), heavy_epilogue, weight_transposed)
        # Few rows: the call is a stream of its weight, timed as a decode step runs it.
        streamed = autotune_cache.Streamed((weight,), run) if key[1] <= autotune_cache.STREAMED_M else None
        return autotune_cache.tune("linear", key, candidates, run, benchmark=x2.is_cuda, streamed=streamed), run


# Activations cuBLASLt applies in the GEMM's epilogue along with the bias (its GELU is the tanh form).
_CUBLASLT_EPILOGUES = {"gelu_tanh": True, "relu": False}  # activation -> use_gelu


def cublas_linear(
    x2: torch.Tensor,
    weight: torch.Tensor,
    weight_transposed: bool,
    bias: torch.Tensor | None,
    r2: torch.Tensor | None,
    y2: torch.Tensor,
    activation: str,
) -> None:
    """y2 = act(x2 @ W^T + bias) + r2 through torch: one cuBLAS(Lt) GEMM with the bias fused, then the
    activation in place (or in the GEMM's epilogue where cuBLASLt has it) and the residual added in place.
    The tuner times the whole sequence against the Triton kernel."""
    w = weight if weight_transposed else weight.t()  # [K, N]
    if bias is not None and activation in _CUBLASLT_EPILOGUES and x2.is_cuda:
        # On CPU this op's GELU is the exact form, so it is only used where it matches gelu_tanh.
        torch._addmm_activation(bias, x2, w, use_gelu=_CUBLASLT_EPILOGUES[activation], out=y2)
    else:
        if bias is not None:
            torch.addmm(bias, x2, w, out=y2)
        else:
            torch.mm(x2, w, out=y2)
        _activation_in_place(y2, activation)
    if r2 is not None:
        y2.add_(r2)


def _activation_in_place(y: torch.Tensor, activation: str) -> None:
    # In place: one read and one write of y, where y.copy_(act(y)) costs two of each.
    if activation == "relu":
        y.relu_()
    elif activation in ("gelu", "gelu_tanh"):
        torch._C._nn.gelu_(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    elif activation == "silu":
        torch.nn.functional.silu(y, inplace=True)
    elif activation == "tanh":
        y.tanh_()
    elif activation != "none":
        raise ValueError(f"activation: unknown activation {activation!r}")


def _out_features(weight: torch.Tensor, weight_transposed: bool) -> int:
    return weight.shape[1] if weight_transposed else weight.shape[0]


def check_linear_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    residual: torch.Tensor | None,
    weight_transposed: bool,
) -> None:
    """Raise a ValueError naming the first bad argument of linear()."""
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least rank 1 ([..., in_features]), got shape {tuple(x.shape)}")
    check_tensor("weight", weight, ndim=2, like=x)
    in_features = weight.shape[0] if weight_transposed else weight.shape[1]
    if in_features != x.shape[-1]:
        layout = "[in, out]" if weight_transposed else "[out, in]"
        raise ValueError(
            f"weight: shape {tuple(weight.shape)} read as {layout} has {in_features} in_features, "
            f"but x has {x.shape[-1]}"
        )
    n = _out_features(weight, weight_transposed)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, like=x)
        if bias.shape[0] != n:
            raise ValueError(f"bias: shape {tuple(bias.shape)} does not match out_features {n}")
    check_activation(activation, allow_none=True)
    if residual is not None:
        check_tensor("residual", residual, like=x)
        want = (*x.shape[:-1], n)
        if tuple(residual.shape) != want:
            raise ValueError(f"residual: shape {tuple(residual.shape)} differs from the output's {want}")


def linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    weight_transposed: bool = False,
) -> torch.Tensor:
    """Plain torch: act(x @ weight.T + bias) + residual in fp32, cast back to x's dtype."""
    w = weight.float().t() if weight_transposed else weight.float()
    y = F.linear(x.float(), w, bias.float() if bias is not None else None)
    y = torch_activation(y, activation)
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    weight_transposed: bool = False,
) -> torch.Tensor:
    """act(x @ weight.T + bias) + residual in one kernel, accumulating in fp32.

    x: [..., in]; weight: [out, in], or [in, out] with weight_transposed (GPT-2's Conv1D), read in place;
    bias: [out] or None; activation: None, "relu", "gelu" (erf), "gelu_tanh", "silu" or "tanh";
    residual: [..., out] or None, added after the activation.
    Returns y: [..., out] in x's dtype. fp32 inputs multiply in full fp32 ("ieee"), never TF32.
    """
    check_linear_args(x, weight, bias, activation, residual, weight_transposed)
    if not runs_triton(x):
        return linear_reference(
            x, weight, bias, activation=activation, residual=residual, weight_transposed=weight_transposed
        )
    k, n = x.shape[-1], _out_features(weight, weight_transposed)
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    # Views where possible: the kernel takes any strides.
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    r2 = residual.reshape(-1, n) if residual is not None else None
    launch_linear(
        x2, weight, bias.contiguous() if bias is not None else None, r2, y.view(-1, n), activation, weight_transposed
    )
    return y


def linear_call(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    residual: torch.Tensor | None,
    weight_transposed: bool,
) -> torch.Tensor:
    return linear(x, weight, bias, activation=activation, residual=residual, weight_transposed=weight_transposed)


linear_op = custom_op("kernl::linear", linear_call, mutates_args=())


@linear_op.register_fake
def _(x, weight, bias, activation, residual, weight_transposed):
    return x.new_empty((*x.shape[:-1], _out_features(weight, weight_transposed)))
