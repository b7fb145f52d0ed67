"""layer_norm / rms_norm with residual against torch's separate add + norm, in GB/s of copy bandwidth."""

import pytest
import torch
import torch.nn.functional as F

from kernl.kernels import layer_norm, rms_norm

SHAPES = [(1, 768), (128, 768), (4096, 768), (1024, 2048), (4096, 4096), (256, 8192)]


def _torch_rms(x, w, eps):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype) * w


@pytest.mark.parametrize("implementation", ["kernl", "torch"])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("rows, hidden", SHAPES)
def test_benchmark_norm_residual(measure, benchmark, implementation, kind, rows, hidden):
    benchmark.group = f"{kind}+residual {rows}x{hidden}"
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.float16)
    r, w, b = torch.randn_like(x), torch.randn(hidden, device="cuda", dtype=torch.float16), None
    if kind == "layer_norm":
        b = torch.randn(hidden, device="cuda", dtype=torch.float16)
        kernl_fn = lambda: layer_norm(x, w, b, 1e-5, residual=r)  # noqa: E731
        torch_fn = lambda: F.layer_norm(x + r, (hidden,), w, b, 1e-5)  # noqa: E731
    else:
        kernl_fn = lambda: rms_norm(x, w, 1e-6, residual=r)  # noqa: E731
        torch_fn = lambda: _torch_rms(x + r, w, 1e-6)  # noqa: E731
    # The floor: read x and residual, write the normed output and the sum.
    measure(kernl_fn if implementation == "kernl" else torch_fn, bytes_moved=4 * x.numel() * x.element_size())
