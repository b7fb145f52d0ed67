"""A row-parallel linear (attention out, MLP down), the sum of its outputs over ranks, the residual add and the RMS
norm after it, as one op.

Where the fused sum + norm runs (kernels/peer_norm.py) and the linear's tuned config is a GEMV (decode rows),
the GEMV's programs store their outputs straight into every rank's places (_gemv_push_kernel) and the norm kernel
polls them, this rank's own included: the NVLink latency of the sum starts at the GEMV's last store, not after
its end and the norm kernel's start. Everywhere else it is kernl.linear, then kernl.all_reduce_add_rms_norm.
Llama-8B geometry at batch 1 on 2 H200s (BENCHMARKS.md, eighth session): 2.591 ms/token against 2.622 with the two
apart (KERNL_PEER_LINEAR_NORM=0, an A/B switch).
"""

from __future__ import annotations

import os

import torch

from kernl.kernels import peer_norm
from kernl.kernels._backend import HAS_TRITON, runs_triton
from kernl.kernels._custom_ops import custom_op
from kernl.kernels.linear import linear

if HAS_TRITON:
    from kernl.kernels._gemv import GEMV, gemv_launch_options
    from kernl.kernels._gemv_push_kernel import gemv_push_kernel
    from kernl.kernels._pdl import pdl_options, prefetch_span
    from kernl.kernels.linear import linear_plan

# Read at import, changeable for tests and benchmarks; every rank must see the same value.
ENABLED = os.environ.get("KERNL_PEER_LINEAR_NORM", "1") != "0"


def linear_all_reduce_add_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_transposed: bool,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(total), total), total = the sum over ranks of x @ weight.T + residual.

    x: [..., in]; weight: [out, in] (or [in, out] with weight_transposed); residual: [..., out]."""
    if ENABLED and HAS_TRITON and not weight_transposed and runs_triton(x) and weight.stride(1) == 1:
        ws = peer_norm.workspace_for(residual) if peer_norm.fusable(residual, residual, norm_weight) else None
        if ws is not None:
            x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
            n = weight.shape[0]
            y2 = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
            config, run = linear_plan(x2, weight, None, None, y2, None, False)
            if config.get(GEMV) and x2.shape[0] <= config["BLOCK_M"]:
                _launch_push(x2, weight, ws, config)
                return peer_norm.launch(ws, None, residual, norm_weight, eps, weight_offset)
            run(config)
            return peer_norm.launch(ws, y2.view(residual.shape), residual, norm_weight, eps, weight_offset)
    y = linear(x, weight, weight_transposed=weight_transposed)
    return peer_norm.all_reduce_add_rms_norm(y, residual, norm_weight, eps, weight_offset)


def _launch_push(x2: torch.Tensor, weight: torch.Tensor, ws: peer_norm.Workspace, config: dict[str, int]) -> None:
    m, k = x2.shape
    n = weight.shape[0]
    pdl = pdl_options(x2)
    gemv_push_kernel[(-(-n // config["BLOCK_N"]),)](
        x2,
        weight,
        m,
        n,
        k,
        x2.stride(0),
        x2.stride(1),
        weight.stride(0),
        weight.stride(1),
        ws.bases,
        ws.counters,
        ws.rank,
        ws.world,
        **gemv_launch_options(config, k, pdl, prefetch_span(pdl, m, k)),
    )


linear_all_reduce_add_rms_norm_call = linear_all_reduce_add_rms_norm  # the name kernl.kernels.direct imports


linear_all_reduce_add_rms_norm_op = custom_op(
    "kernl::linear_all_reduce_add_rms_norm", linear_all_reduce_add_rms_norm_call, mutates_args=()
)


@linear_all_reduce_add_rms_norm_op.register_fake
def _(x, weight, weight_transposed, residual, norm_weight, eps, weight_offset=0.0):
    return torch.empty_like(residual), torch.empty_like(residual)
