"""The decode GEMV configs of linear and gated_linear: each against an fp64 formula, odd shapes, every epilogue."""

import importlib

import pytest
import torch

from kernl.kernels import autotune_cache, gated_linear, linear
from kernl.kernels._gemv import GEMV, MAX_M, gemv_configs
from tests.kernels.helpers import make_weight, rel_err
from tests.kernels.test_gated_linear import formula as gated_formula
from tests.kernels.test_linear import TOL, formula

linear_module = importlib.import_module("kernl.kernels.linear")
gated_module = importlib.import_module("kernl.kernels.gated_linear")


@pytest.fixture
def only(monkeypatch, fresh_autotune):
    """Make one config the only candidate of a kernel module's config function (frozen: run untimed)."""
    autotune_cache.set_frozen(True)

    def use(module, name, config):
        monkeypatch.setattr(module, name, lambda *args, **kwargs: [config])

    return use


def configs_for(m, n, k, weight_tiles=1):
    """The GEMV configs of one row, widened to m rows: the kernel takes any BLOCK_M >= M, though the tuner offers
    it only at M=1 (at M=4 the tile kernels won on an H200)."""
    configs = gemv_configs(1, n, k, weight_tiles=weight_tiles)
    assert configs and all(c[GEMV] == 1 for c in configs)
    return [{**c, "BLOCK_M": autotune_cache.bucket_m(m)} for c in configs]


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m, n, k", [(1, 17, 24), (3, 48, 40), (4, 40, 64), (1, 33, 300)])
@pytest.mark.parametrize("transposed", [False, True])
def test_every_gemv_config_matches_formula(only, dtype, m, n, k, transposed):
    # A masked K tail (24, 40, 300 against blocks of 16+), partial row blocks, bias, activation and residual.
    x, b, r = torch.randn(m, k, dtype=dtype), torch.randn(n, dtype=dtype), torch.randn(m, n, dtype=dtype)
    w = make_weight(k, n, dtype) if transposed else make_weight(n, k, dtype)
    want = formula(x, w, b, "gelu", r, transposed=transposed)
    for config in configs_for(m, n, k):
        only(linear_module, "linear_configs", config)
        y = linear(x, w, b, activation="gelu", residual=r, weight_transposed=transposed)
        assert rel_err(y, want) < TOL[dtype], config
        assert rel_err(linear(x, w, weight_transposed=transposed), formula(x, w, transposed=transposed)) < TOL[dtype]


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m, n, k", [(1, 17, 24), (2, 48, 64), (4, 40, 100)])
def test_every_gated_gemv_config_matches_formula(only, dtype, m, n, k):
    x = torch.randn(m, k, dtype=dtype)
    wg, wu = make_weight(n, k, dtype), make_weight(n, k, dtype)
    for config in configs_for(m, n, k, weight_tiles=2):
        only(gated_module, "gated_linear_configs", config)
        assert rel_err(gated_linear(x, wg, wu, activation="silu"), gated_formula(x, wg, wu, "silu")) < TOL[dtype]


@pytest.mark.usefixtures("poisoned_empty")
def test_gated_gemv_reads_strided_weights(only):
    # gate and up interleaved row by row in one fused tensor, x a row-strided view.
    x = torch.randn(2, 64)[:, 8:48]
    fused = make_weight(96, 40, torch.float32).view(48, 2, 40)
    wg, wu = fused[:, 0], fused[:, 1]
    only(gated_module, "gated_linear_configs", configs_for(2, 48, 40, weight_tiles=2)[0])
    assert rel_err(gated_linear(x, wg, wu), gated_formula(x, wg, wu, "silu")) < TOL[torch.float32]


def test_gemv_configs_alone_for_a_few_rows_of_a_row_major_weight():
    assert gemv_configs(MAX_M * 2, 4096, 4096) == []
    assert all(GEMV not in c for c in linear_module.linear_configs(64, 4096, 4096, 2, False))
    assert all(c.get(GEMV) for c in linear_module.linear_configs(1, 4096, 4096, 2, False))
    assert all(c.get(GEMV) for c in gated_module.gated_linear_configs(1, 14336, 4096, 2))
    assert all(GEMV not in c for c in gated_module.gated_linear_configs(2, 14336, 4096, 2))
    # Conv1D's [K, N] weight would be read across K with a stride: the tile and cuBLAS candidates stay.
    assert all(GEMV not in c for c in linear_module.linear_configs(1, 4096, 4096, 2, False, True))
    # Accumulator budget: per weight, per thread, at most 64 fp32 values.
    for tiles in (1, 2):
        for c in gemv_configs(1, 4096, 4096, weight_tiles=tiles):
            assert tiles * c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"] <= 64 * 32 * c["num_warps"]
