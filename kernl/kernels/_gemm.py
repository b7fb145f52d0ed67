"""Pieces the GEMM kernels share: epilogue activations (torch and Triton), tile order, the K loop, configs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernl.kernels._backend import HAS_TRITON

# The element-wise functions a GEMM epilogue can apply; "gelu" is the exact (erf) form.
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "tanh")

# Shared memory a config's pipelined tiles may take: under the A100's 163 KiB, well under the H100's 227.
SMEM_BUDGET = 160 * 1024


def check_activation(activation: object, *, allow_none: bool) -> None:
    """Raise a ValueError naming `activation` unless it is one of ACTIVATIONS (or None where allowed)."""
    if activation is None and allow_none:
        return
    if activation not in ACTIVATIONS:
        allowed = ", ".join((("None",) if allow_none else ()) + ACTIVATIONS)
        raise ValueError(f"activation: unknown activation {activation!r} (expected one of {allowed})")


def torch_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """The reference form of each epilogue activation, in whatever dtype y has."""
    if activation is None:
        return y
    if activation == "relu":
        return F.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "silu":
        return F.silu(y)
    return torch.tanh(y)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def fit_configs(
    table: list[tuple[int, ...]],
    *,
    m_bucket: int,
    n: int,
    k: int,
    elem_size: int,
    weight_tiles: int = 1,
    max_acc_per_thread: int = 128,
) -> list[dict[str, int]]:
    """Turn (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) rows into configs that suit this problem.

    Blocks are clamped to the problem (no 128-wide tile for N=17; at least 16, tl.dot's minimum on
    Triton 3.6). Each weight tile has its own fp32 accumulator: warps double (up to 8) until each
    thread holds at most max_acc_per_thread accumulator values, past which the epilogue spills
    registers (checked with ptxas for sm_90), else the config goes. Stages drop until the pipelined
    x tile plus the weight tiles fit SMEM_BUDGET. Duplicates go; the table's order is kept, so the
    first config is the untuned default.
    """
    max_k = 256
    if elem_size >= 4:
        # fp32 runs "ieee" FMA dots, which hold whole operand slices in registers: short K steps and
        # half-size accumulators, or ptxas spills kilobytes.
        max_k, max_acc_per_thread = 32, min(max_acc_per_thread, 64)
    configs: list[dict[str, int]] = []
    for block_m, block_n, block_k, warps, stages in table:
        block_m = min(block_m, max(16, m_bucket))
        block_n = min(block_n, max(16, _next_pow2(n)))
        block_k = min(block_k, max_k, max(16, _next_pow2(k)))
        acc_values = weight_tiles * block_m * block_n
        while warps < 8 and acc_values > max_acc_per_thread * 32 * warps:
            warps *= 2
        stage_bytes = (block_m * block_k + weight_tiles * block_k * block_n) * elem_size
        while stages > 2 and stages * stage_bytes > SMEM_BUDGET:
            stages -= 1
        if stages * stage_bytes > SMEM_BUDGET or acc_values > max_acc_per_thread * 32 * warps:
            continue
        config = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=warps, num_stages=stages)
        if config not in configs:
            configs.append(config)
    return configs


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Map a program id to its (row block, column block) of the output."""
        # Walk GROUP_M row blocks down a column before moving right: programs running at the same
        # time share weight tiles (and x tiles) in L2 instead of each streaming its own from DRAM.
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        group_width = GROUP_M * num_pid_n
        first_m = (pid // group_width) * GROUP_M
        # The last group is shorter when num_pid_m is not a multiple of GROUP_M.
        group_rows = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group_width) % group_rows
        pid_n = (pid % group_width) // group_rows
        return pid_m, pid_n

    @triton.jit
    def accumulate_k_range(
        x_ptrs,  # [BLOCK_M, BLOCK_K] pointers to the x tile at the range's first k
        w_ptrs,  # [BLOCK_K, BLOCK_N] pointers to the weight tile at the range's first k
        stride_xk,
        stride_wk,
        k_span,  # length of the K range this program walks from the pointers, in BLOCK_K steps
        k_limit,  # K left from the pointers' first k: loads at or past it read zeros (unless EVEN_K)
        INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs: exact products, no silent TF32
        EVEN_K: tl.constexpr,  # every step lies inside K: no mask
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """x @ w over one K range as an fp32 [BLOCK_M, BLOCK_N] tile: the K loop of linear and split-K."""
        offs_k = tl.arange(0, BLOCK_K)
        # fp32 accumulator whatever the input dtype.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_start in range(0, k_span, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs)
                w = tl.load(w_ptrs)
            else:
                # Zeros past K add nothing to the dot product.
                k_left = k_limit - k_start
                x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc = tl.dot(x, w, acc=acc, input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        return acc

    @triton.jit
    def _tanh(x):
        # exp of a non-positive number only: no overflow for large |x|, and no libdevice dependency.
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)

    @triton.jit
    def apply_activation(x, ACTIVATION: tl.constexpr):
        """Apply the named activation to an fp32 tile; "none" returns it unchanged."""
        if ACTIVATION == "relu":
            x = tl.maximum(x, 0.0)
        elif ACTIVATION == "gelu":
            x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
        elif ACTIVATION == "gelu_tanh":
            x = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
        elif ACTIVATION == "silu":
            # sigmoid from exp(-|x|) so that very negative x does not overflow.
            e = tl.exp(-tl.abs(x))
            x = x * tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        elif ACTIVATION == "tanh":
            x = _tanh(x)
        return x
