"""Programmatic dependent launch (Hopper and later): a kernel is launched while the one before it finishes.

Every kernl kernel starts with `wait_for_inputs(USE_PDL)`: it waits until the previous kernel's writes are
visible, then lets the next kernel launch. So at most one kernel is in flight ahead of the one running, and
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
    # First statement of every kernel: nothing may be read from, or written to, activations before it.
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


def pdl_options(t: torch.Tensor) -> dict[str, bool]:
    """Launch keywords for a kernel that takes USE_PDL: the constexpr and, where on, Triton's launch flag."""
    if use_pdl(t):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}
