"""linear (fused epilogue) and gated_linear against torch's separate ops and cuBLAS, in TFLOP/s.

Targets on an H100, fp16: at M <= 512, at least 1.2x faster than torch's separate kernels; on plain
large GEMMs, within 10% of cuBLAS (F.linear).
"""

import pytest
import torch
import torch.nn.functional as F

from kernl.kernels import gated_linear, linear

DTYPE = torch.float16
SMALL_M = [1, 16, 128, 512]
# (in, out): BERT-base FFN up and down, Llama-class 1.2B attention and MLP up projections.
EPILOGUE_SHAPES = [(768, 3072), (3072, 768), (2048, 2048), (2048, 8192)]


def _weight(out_f, in_f):
    return torch.randn(out_f, in_f, device="cuda").div(in_f**0.5).to(DTYPE)


def _pick(implementation, kernl_fn, torch_fn):
    if implementation == "torch":
        return torch_fn
    kernl_fn()  # tune and compile once, outside the timed runs
    return kernl_fn


@pytest.mark.parametrize("implementation", ["kernl", "torch"])
@pytest.mark.parametrize("m", SMALL_M)
@pytest.mark.parametrize("k, n", EPILOGUE_SHAPES)
def test_benchmark_linear_gelu_residual(measure, benchmark, implementation, m, k, n):
    benchmark.group = f"linear+gelu+residual m={m} {k}->{n}"
    x, w = torch.randn(m, k, device="cuda", dtype=DTYPE), _weight(n, k)
    b, r = torch.randn(n, device="cuda", dtype=DTYPE), torch.randn(m, n, device="cuda", dtype=DTYPE)
    fn = _pick(
        implementation,
        lambda: linear(x, w, b, activation="gelu", residual=r),
        lambda: F.gelu(F.linear(x, w, b)) + r,
    )
    # The floor: read x, W, bias and the residual once, write y once.
    measure(fn, flops=2 * m * n * k, bytes_moved=(m * k + n * k + n + 2 * m * n) * x.element_size())


@pytest.mark.parametrize("implementation", ["kernl", "torch"])
@pytest.mark.parametrize("k, n", [(768, 768), (3072, 768)])
def test_benchmark_linear_bias_bert(measure, benchmark, implementation, k, n):
    # BERT-base at batch 1 x seq 128: few output tiles and a long K walk, where split-K pays.
    m = 128
    benchmark.group = f"linear+bias m={m} {k}->{n}"
    x, w, b = torch.randn(m, k, device="cuda", dtype=DTYPE), _weight(n, k), torch.randn(n, device="cuda", dtype=DTYPE)
    fn = _pick(implementation, lambda: linear(x, w, b), lambda: F.linear(x, w, b))
    measure(fn, flops=2 * m * n * k, bytes_moved=(m * k + n * k + n + m * n) * x.element_size())


@pytest.mark.parametrize("implementation", ["kernl", "torch"])
@pytest.mark.parametrize("m, n, k", [(4096, 4096, 4096), (8192, 4096, 4096)])
def test_benchmark_linear_large_gemm(measure, benchmark, implementation, m, n, k):
    benchmark.group = f"linear {m}x{k}->{n}"
    x, w = torch.randn(m, k, device="cuda", dtype=DTYPE), _weight(n, k)
    fn = _pick(implementation, lambda: linear(x, w), lambda: F.linear(x, w))
    measure(fn, flops=2 * m * n * k, bytes_moved=(m * k + n * k + m * n) * x.element_size())


@pytest.mark.parametrize("implementation", ["kernl", "torch"])
@pytest.mark.parametrize("m", [*SMALL_M, 4096])
def test_benchmark_gated_linear_llama(measure, benchmark, implementation, m):
    hidden, inter = 2048, 8192
    benchmark.group = f"swiglu m={m} {hidden}->{inter}"
    x = torch.randn(m, hidden, device="cuda", dtype=DTYPE)
    wg, wu = _weight(inter, hidden), _weight(inter, hidden)
    fn = _pick(
        implementation,
        lambda: gated_linear(x, wg, wu),
        lambda: F.silu(F.linear(x, wg)) * F.linear(x, wu),
    )
    # Two GEMMs' worth of FLOPs; the floor reads x and both weights, writes y.
    measure(
        fn, flops=4 * m * inter * hidden, bytes_moved=(m * hidden + 2 * inter * hidden + m * inter) * x.element_size()
    )
