"""gated_linear (SwiGLU, GeGLU) against its reference and an independent fp64 formula."""

import importlib

import pytest
import torch

from kernl.kernels import autotune_cache, gated_linear, gated_linear_reference
from tests.kernels.helpers import FP64_ACT, make_weight, rel_err

# The module, not the function the package re-exports under the same name.
gated_module = importlib.import_module("kernl.kernels.gated_linear")

TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
GPU_TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2}


def formula(x, wg, wu, activation):
    """act(x @ Wg.T) * (x @ Wu.T) in fp64, written independently of the kernel and its reference."""
    x = x.double()
    return FP64_ACT[activation](x @ wg.double().T) * (x @ wu.double().T)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("x_shape, inter", [((1, 24), 17), ((7, 40), 48), ((37, 40), 17), ((2, 3, 24), 48)])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu", "tanh"])
def test_gated_linear_matches_reference_and_formula(dtype, x_shape, inter, activation):
    x = torch.randn(x_shape, dtype=dtype)
    wg, wu = make_weight(inter, x_shape[-1], dtype), make_weight(inter, x_shape[-1], dtype)
    y = gated_linear(x, wg, wu, activation=activation)
    assert y.dtype == dtype and y.shape == (*x_shape[:-1], inter)
    assert rel_err(y, gated_linear_reference(x, wg, wu, activation=activation)) < TOL[dtype]
    assert rel_err(y, formula(x, wg, wu, activation)) < TOL[dtype]


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_linear_takes_strided_views(dtype):
    x = torch.randn(7, 64, dtype=dtype)[:, 8:48]  # rows 64 apart
    # gate and up interleaved row by row in one fused tensor: each a view with rows 80 apart.
    fused = make_weight(96, 40, dtype).view(48, 2, 40)
    wg, wu = fused[:, 0], fused[:, 1]
    assert rel_err(gated_linear(x, wg, wu), formula(x, wg, wu, "silu")) < TOL[dtype]


@pytest.mark.usefixtures("poisoned_empty", "fresh_autotune")
@pytest.mark.parametrize("block_m, block_n, block_k, group_m", [(16, 16, 16, 2), (32, 32, 16, 1)])
def test_gated_linear_any_tile_config_covers_the_output(monkeypatch, block_m, block_n, block_k, group_m):
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, num_warps=4, num_stages=2)
    monkeypatch.setattr(gated_module, "gated_linear_configs", lambda *args: [config])
    x = torch.randn(37, 40, dtype=torch.float16)
    wg, wu = make_weight(48, 40, torch.float16), make_weight(48, 40, torch.float16)
    assert rel_err(gated_linear(x, wg, wu, activation="gelu"), formula(x, wg, wu, "gelu")) < TOL[torch.float16]


def test_gated_linear_custom_op_and_fake():
    x = torch.randn(2, 5, 24)
    wg, wu = make_weight(17, 24, torch.float32), make_weight(17, 24, torch.float32)
    y = torch.ops.kernl.gated_linear(x, wg, wu, "silu")
    assert rel_err(y, formula(x, wg, wu, "silu")) < TOL[torch.float32]
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fx, fw = torch.empty(3, 7, 24, dtype=torch.bfloat16), torch.empty(48, 24, dtype=torch.bfloat16)
        out = torch.ops.kernl.gated_linear(fx, fw, fw, "gelu_tanh")
        assert out.shape == (3, 7, 48) and out.dtype == torch.bfloat16


def _args(**overrides):
    args = dict(x=torch.randn(4, 8), weight_gate=torch.randn(6, 8), weight_up=torch.randn(6, 8), activation="silu")
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "args, name",
    [
        (_args(x=torch.randn(())), "x"),
        (_args(x=torch.randint(0, 3, (4, 8))), "x"),
        (_args(weight_gate=torch.randn(6, 8, 1)), "weight_gate"),
        (_args(weight_gate=torch.randn(6, 9)), "weight_gate"),
        (_args(weight_gate=torch.randn(6, 8).half()), "weight_gate"),
        (_args(weight_up=torch.randn(7, 8)), "weight_up"),
        (_args(weight_up=torch.randn(6, 8, device="meta")), "weight_up"),
        (_args(activation=None), "activation"),
        (_args(activation="swiglu"), "activation"),
    ],
)
def test_gated_linear_bad_input_names_the_argument(args, name):
    args = dict(args)
    with pytest.raises(ValueError, match=f"^{name}:"):
        gated_linear(args.pop("x"), args.pop("weight_gate"), args.pop("weight_up"), **args)


# --- on a GPU -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 128, 512, 4096])
def test_swiglu_at_llama_sizes_on_gpu(dtype, m):
    hidden, inter = 2048, 8192
    x = torch.randn(m, hidden, device="cuda", dtype=dtype)
    wg, wu = make_weight(inter, hidden, dtype, "cuda"), make_weight(inter, hidden, dtype, "cuda")
    y = gated_linear(x, wg, wu)
    ref = gated_linear_reference(x.float(), wg.float(), wu.float())
    assert rel_err(y, ref) < GPU_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("m", [7, 300])
def test_geglu_on_gpu(activation, m):
    x = torch.randn(2, m, 768, device="cuda", dtype=torch.float16)
    wg, wu = make_weight(3072, 768, torch.float16, "cuda"), make_weight(3072, 768, torch.float16, "cuda")
    y = gated_linear(x, wg, wu, activation=activation)
    assert rel_err(y, formula(x, wg, wu, activation)) < GPU_TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_autotune")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 32, 512, 4096])
def test_every_gated_candidate_runs_and_is_right_on_gpu(monkeypatch, dtype, m):
    # Each candidate by itself (the tuner would silently skip one that fails to compile or launch).
    hidden, inter = 2048, 1024
    x = torch.randn(m, hidden, device="cuda", dtype=dtype)
    wg, wu = make_weight(inter, hidden, dtype, "cuda"), make_weight(inter, hidden, dtype, "cuda")
    want = formula(x, wg, wu, "silu")
    autotune_cache.set_frozen(True)  # frozen: the only candidate runs, untimed
    tol = 1e-4 if dtype == torch.float32 else GPU_TOL[dtype]
    for config in gated_module.gated_linear_configs(autotune_cache.bucket_m(m), inter, hidden, x.element_size()):
        monkeypatch.setattr(gated_module, "gated_linear_configs", lambda *args, c=config: [c])
        assert rel_err(gated_linear(x, wg, wu), want) < tol, config
        monkeypatch.undo()
