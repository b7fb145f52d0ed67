"""Programmatic dependent launch (Hopper and later): a kernel is launched while the one before it finishes.

Every kernl kernel calls `wait_for_inputs(USE_PDL)` before it touches an activation: it waits until the previous
kernel's writes are visible, then lets the next kernel launch (GEMMs first prefetch their weights, which no
kernel writes). So at most one kernel is in flight ahead of the one running, and
its launch latency and block scheduling overlap the tail of its predecessor instead of following it. Inside
a CUDA graph of ~100 small kernels that is one launch gap saved per kernel boundary.

Safe in any order with other kernels: a kernel launched without the attribute (cuBLAS, torch ops) waits for
full completion as usual, and a PDL launch after one simply starts when it ends.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # Triton without grid dependency control: kernels launch the ordinary way
    HAS_GDC = False

# Off with KERNL_PDL=0 (an A/B switch and an escape hatch); read at import, changeable for tests and benchmarks.
ENABLED = os.environ.get("KERNL_PDL", "1") != "0"
# The weight prefetch of small-M GEMMs that PDL makes worthwhile (an A/B switch for benchmarks).
PREFETCH = True


def _span_from_env() -> int:
    value = os.environ.get("KERNL_PREFETCH_K", "128")
    if not value.isdigit() or int(value) < 64 or int(value) & (int(value) - 1):
        raise ValueError(f"KERNL_PREFETCH_K={value!r}: expected a power of two, at least 64")
    return int(value)


# The most of K (elements) a program prefetches: KERNL_PREFETCH_K, read at import (an A/B switch for benchmarks).
# Shorter was faster, down to 128: Llama-8B decode at tp=1/2/4 on H200s (BENCHMARKS.md, eighth session), ms a token
# at 512 / 256 / 128: 4.218 / 4.158 / 4.139, 2.592 / 2.559 / 2.548, 1.797 / 1.773 / 1.761. No prefetch lost (+0.05 at
# tp=1 against 512), and so did longer spans (2048: +0.18 ms at tp=2), even capped in bytes to stay within L2.
PREFETCH_MAX_K = _span_from_env()


@functools.cache
def _hopper_or_later(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def use_pdl(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch with programmatic dependent launch."""
    if not (ENABLED and HAS_GDC and t.is_cuda):
        return False
    return _hopper_or_later(t.device.index if t.device.index is not None else torch.cuda.current_device())


@triton.jit
def wait_for_inputs(USE_PDL: tl.constexpr):
    # Before any activation is read or written; only index arithmetic and weight prefetches may precede it.
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


def pdl_options(t: torch.Tensor) -> dict[str, bool]:
    """Launch keywords for a kernel that takes USE_PDL: the constexpr and, where on, Triton's launch flag."""
    if use_pdl(t):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


def prefetch_span(pdl: dict[str, bool], m: int, k: int) -> int:
    """PREFETCH_K for a GEMM launch: how much of K (elements) each program pulls into L2 before it waits.

    Only with PDL, where the prefetch overlaps the previous kernel, and only for small M, where the GEMM
    streams its weight once; at most PREFETCH_MAX_K elements of K.
    """
    if not (PREFETCH and pdl["USE_PDL"]) or m > 64:
        return 0
    return min(PREFETCH_MAX_K, max(64, triton.next_power_of_2(k)))


@triton.jit
def _prefetch_l2(ptrs):
    # Start the DRAM read of each address's line into L2 now; the dummy result keeps the asm in the program.
    return tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def prefetch_weight_l2(
    W, n0, N, K, stride_wn, stride_wk, SPAN_K: tl.constexpr, BLOCK_N: tl.constexpr, K_CONTIGUOUS: tl.constexpr
):
    """Pull the first SPAN_K of K of this program's BLOCK_N weight rows into L2, one address per 128-byte line.

    Weights never depend on the previous kernel, so this runs before wait_for_inputs and overlaps it."""
    if K_CONTIGUOUS:  # [N, K]: a row's SPAN_K halves are SPAN_K // 64 lines
        ks = tl.minimum(tl.arange(0, SPAN_K // 64) * 64, K - 1)
        ns = (n0 + tl.arange(0, BLOCK_N)) % N
        ptrs = W + ns.to(tl.int64)[:, None] * stride_wn + ks[None, :] * stride_wk
    else:  # [K, N] (Conv1D): each of SPAN_K rows holds BLOCK_N contiguous halves
        ks = tl.minimum(tl.arange(0, SPAN_K), K - 1)
        if BLOCK_N >= 64:
            ns = (n0 + tl.arange(0, BLOCK_N // 64) * 64) % N
        else:
            ns = (n0 + tl.arange(0, 1)) % N
        ptrs = W + ks.to(tl.int64)[:, None] * stride_wk + ns[None, :] * stride_wn
    _prefetch_l2(ptrs)
