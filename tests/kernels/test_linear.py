"""linear against its reference and an independent fp64 formula: odd shapes, every activation and layout."""

import importlib
import json

import pytest
import torch
import torch.nn.functional as F

from kernl.kernels import autotune_cache, linear, linear_reference
from tests.kernels.helpers import FP64_ACT, make_weight, rel_err

# The module, not the function the package re-exports under the same name.
linear_module = importlib.import_module("kernl.kernels.linear")

TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
GPU_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh", "silu", "tanh"]


def formula(x, w, b=None, activation=None, residual=None, transposed=False):
    """act(x @ W.T + b) + residual in fp64, written independently of the kernel and its reference."""
    w = w.double().T if transposed else w.double()
    y = x.double() @ w.T
    if b is not None:
        y = y + b.double()
    y = FP64_ACT[activation](y)
    return y if residual is None else y + residual.double()


def make(shape, dtype, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("x_shape, n", [((1, 24), 17), ((7, 40), 48), ((37, 40), 17), ((2, 3, 24), 48)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_bias, with_residual", [(False, False), (True, False), (False, True), (True, True)])
def test_linear_matches_reference_and_formula(dtype, x_shape, n, activation, with_bias, with_residual):
    x = make(x_shape, dtype)
    w = make_weight(n, x_shape[-1], dtype)
    b = make(n, dtype) if with_bias else None
    r = make((*x_shape[:-1], n), dtype) if with_residual else None
    y = linear(x, w, b, activation=activation, residual=r)
    assert y.dtype == dtype and y.shape == (*x_shape[:-1], n)
    assert rel_err(y, linear_reference(x, w, b, activation=activation, residual=r)) < TOL[dtype]
    assert rel_err(y, formula(x, w, b, activation, r)) < TOL[dtype]


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("x_shape", [(7, 40), (2, 3, 40)])
def test_linear_reads_conv1d_weight_in_place(dtype, x_shape):
    # GPT-2's Conv1D: weight [in, out], y = x @ weight + bias.
    x, w_t, b = make(x_shape, dtype), make_weight(40, 48, dtype), make(48, dtype)
    r = make((*x_shape[:-1], 48), dtype)
    y = linear(x, w_t, b, activation="gelu_tanh", residual=r, weight_transposed=True)
    assert rel_err(y, formula(x, w_t, b, "gelu_tanh", r, transposed=True)) < TOL[dtype]
    ref = linear_reference(x, w_t, b, activation="gelu_tanh", residual=r, weight_transposed=True)
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_takes_strided_views(dtype):
    x = make((7, 64), dtype)[:, 8:48]  # rows 64 apart
    x_t = make((40, 7), dtype).T  # column-major: consecutive k are 7 apart
    w = make_weight(96, 40, dtype)[::2]  # rows 80 apart
    b = make(48, dtype)
    r = make((7, 100), dtype)[:, :48]
    for xi in (x, x_t):
        y = linear(xi, w, b, activation="silu", residual=r)
        assert rel_err(y, formula(xi, w, b, "silu", r)) < TOL[dtype]


@pytest.mark.usefixtures("poisoned_empty", "fresh_autotune")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "block_m, block_n, block_k, group_m", [(16, 16, 16, 2), (32, 16, 32, 8), (16, 32, 16, 1), (64, 64, 64, 8)]
)
def test_linear_any_tile_config_covers_the_output(monkeypatch, dtype, block_m, block_n, block_k, group_m):
    # Many tiles, a partial last row group and a masked K tail: a config loaded from a bundle must be exact too.
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, num_warps=4, num_stages=2)
    monkeypatch.setattr(linear_module, "linear_configs", lambda *args: [config])
    x, w, b, r = make((37, 40), dtype), make_weight(48, 40, dtype), make(48, dtype), make((37, 48), dtype)
    y = linear(x, w, b, activation="gelu", residual=r)
    assert rel_err(y, formula(x, w, b, "gelu", r)) < TOL[dtype]


@pytest.mark.usefixtures("poisoned_empty")
def test_linear_1d_and_empty_inputs():
    x, w, b = make(24, torch.float16), make_weight(17, 24, torch.float16), make(17, torch.float16)
    y = linear(x, w, b, activation="tanh")
    assert y.shape == (17,) and rel_err(y, formula(x, w, b, "tanh")) < TOL[torch.float16]
    assert linear(make((0, 24), torch.float16), w, b).shape == (0, 17)


def test_linear_custom_op_and_fake():
    x, w, b, r = make((2, 5, 24), torch.float32), make_weight(17, 24, torch.float32), make(17, torch.float32), None
    y = torch.ops.kernl.linear(x, w, b, "relu", r, False)
    assert rel_err(y, formula(x, w, b, "relu")) < TOL[torch.float32]
    w_t = make_weight(24, 17, torch.float32)
    r = make((2, 5, 17), torch.float32)
    y = torch.ops.kernl.linear(x, w_t, None, None, r, True)
    assert rel_err(y, formula(x, w_t, None, None, r, transposed=True)) < TOL[torch.float32]
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fx, fw = torch.empty(3, 7, 24, dtype=torch.float16), torch.empty(24, 48, dtype=torch.float16)
        out = torch.ops.kernl.linear(fx, fw, None, "gelu", None, True)
        assert out.shape == (3, 7, 48) and out.dtype == torch.float16


# --- split-K --------------------------------------------------------------------------------------


@pytest.fixture
def run_config(monkeypatch, fresh_autotune):
    """linear() with one given config: the only candidate, run untimed and unrecorded (frozen)."""
    autotune_cache.set_frozen(True)

    def run(config, *args, **kwargs):
        monkeypatch.setattr(linear_module, "linear_configs", lambda *_: [config])
        return linear(*args, **kwargs)

    return run


def split_config(split_k, **tile):
    return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2, SPLIT_K=split_k) | tile


@pytest.mark.usefixtures("poisoned_empty")  # NaN workspace too: a partial tile a split skips shows up
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split_k", [2, 4])  # K=72: a masked tail; at 4 splits the last one is empty
@pytest.mark.parametrize(
    "with_bias, activation, with_residual", [(False, None, False), (True, None, False), (True, "gelu_tanh", True)]
)
def test_split_k_matches_reference(run_config, dtype, split_k, with_bias, activation, with_residual):
    x = make((37, 100), dtype)[:, 8:80]  # 37 rows: a partial row block; rows 100 apart
    w = make_weight(40, 72, dtype)
    b = make(40, dtype) if with_bias else None
    r = make((37, 40), dtype) if with_residual else None
    y = run_config(split_config(split_k), x, w, b, activation=activation, residual=r)
    assert rel_err(y, linear_reference(x, w, b, activation=activation, residual=r)) < TOL[dtype]
    assert rel_err(y, formula(x, w, b, activation, r)) < TOL[dtype]


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_k_reads_conv1d_weight_and_3d_input(run_config, dtype):
    x, w_t, b, r = make((2, 5, 96), dtype), make_weight(96, 24, dtype), make(24, dtype), make((2, 5, 24), dtype)
    config = split_config(2, BLOCK_N=32, BLOCK_K=32)  # K=96 in 3 steps: an even split would need 4
    y = run_config(config, x, w_t, b, activation="silu", residual=r, weight_transposed=True)
    assert rel_err(y, formula(x, w_t, b, "silu", r, transposed=True)) < TOL[dtype]


def test_split_k_candidates_follow_the_plain_configs():
    configs = linear_module.linear_configs(128, 768, 3072, 2, False)
    assert configs[0].get("SPLIT_K", 1) == 1
    split = [c for c in configs if c.get("SPLIT_K", 1) > 1]
    assert 1 <= len(split) <= 4 and configs[-len(split) - 1 : -1] == split
    assert configs[-1] == {linear_module.CUBLAS: 1}  # cuBLAS competes last
    for c in split:
        assert c["SPLIT_K"] in (2, 4, 8) and -(-3072 // c["BLOCK_K"]) >= 2 * c["SPLIT_K"]
    # Large M fills the GPU with tiles, short K has little to split: plain configs only.
    for m_bucket, k in [(512, 3072), (128, 768)]:
        assert all("SPLIT_K" not in c for c in linear_module.linear_configs(m_bucket, 768, k, 2, False))


@pytest.mark.usefixtures("fresh_autotune")
def test_split_k_decision_survives_export_and_load(monkeypatch):
    # A bundle stores the decision as JSON; loaded and frozen, it runs split-K again.
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors run Triton only when interpreted
    x, w, b = make((9, 64), torch.float32, dev), make_weight(24, 64, torch.float32, dev), make(24, torch.float32, dev)
    monkeypatch.setattr(linear_module, "linear_configs", lambda *_: [split_config(2)])
    linear(x, w, b)  # the only candidate is recorded
    saved = json.loads(json.dumps(autotune_cache.export()))
    assert [e["config"]["SPLIT_K"] for e in saved["entries"]] == [2]
    monkeypatch.undo()
    autotune_cache.clear()
    autotune_cache.load(saved)
    autotune_cache.set_frozen(True)
    calls = []
    real_launch = linear_module.launch_split_k

    def launch(*args):
        calls.append(args[-1])
        real_launch(*args)

    monkeypatch.setattr(linear_module, "launch_split_k", launch)
    y = linear(x, w, b)
    assert len(calls) == 1 and rel_err(y, formula(x, w, b)) < TOL[torch.float32]


def _args(**overrides):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(5, 8), bias=None, activation=None, residual=None)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "args, name",
    [
        (_args(x=torch.randn(())), "x"),
        (_args(x=torch.randint(0, 3, (4, 8))), "x"),
        (_args(weight=torch.randn(5, 8, 1)), "weight"),
        (_args(weight=torch.randn(5, 9)), "weight"),
        (_args(weight_transposed=True), "weight"),
        (_args(weight=torch.randn(5, 8).half()), "weight"),
        (_args(weight=torch.randn(5, 8, device="meta")), "weight"),
        (_args(bias=torch.randn(6)), "bias"),
        (_args(bias=torch.randn(1, 5)), "bias"),
        (_args(bias=torch.randn(5).double()), "bias"),
        (_args(activation="swish"), "activation"),
        (_args(residual=torch.randn(4, 8)), "residual"),
        (_args(residual=torch.randn(5).half()), "residual"),
        (_args(residual=torch.randn(4, 5).half()), "residual"),
    ],
)
def test_linear_bad_input_names_the_argument(args, name):
    args = dict(args)
    with pytest.raises(ValueError, match=f"^{name}:"):
        linear(args.pop("x"), args.pop("weight"), args.pop("bias"), **args)


# --- on a GPU -------------------------------------------------------------------------------------

# (in, out) of BERT-base, GPT-2 (fused qkv) and a Llama-class 1.2B model's projections.
GPU_SHAPES = [(768, 768), (768, 3072), (3072, 768), (768, 2304), (2048, 2048), (2048, 8192), (8192, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 128, 512, 4096])
@pytest.mark.parametrize("k, n", GPU_SHAPES)
def test_linear_gelu_residual_on_gpu(dtype, m, k, n):
    x, w = make((m, k), dtype, "cuda"), make_weight(n, k, dtype, "cuda")
    b, r = make(n, dtype, "cuda"), make((m, n), dtype, "cuda")
    y = linear(x, w, b, activation="gelu", residual=r)
    want = linear_reference(x.float(), w.float(), b.float(), activation="gelu", residual=r.float())
    assert rel_err(y, want) < GPU_TOL[dtype]
    if dtype == torch.float16:  # the plain GEMM too: its own, larger-tile configs
        assert rel_err(linear(x, w), F.linear(x.float(), w.float())) < GPU_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 37, 1023])
def test_linear_conv1d_and_fp32_on_gpu(dtype, m):
    # GPT-2 c_fc: Conv1D weight [768, 3072], gelu_tanh; fp32 runs "ieee" products, so a tight tolerance.
    x, w_t, b = make((m, 768), dtype, "cuda"), make_weight(768, 3072, dtype, "cuda"), make(3072, dtype, "cuda")
    y = linear(x, w_t, b, activation="gelu_tanh", weight_transposed=True)
    assert rel_err(y, formula(x, w_t, b, "gelu_tanh", transposed=True)) < GPU_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_autotune")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 32, 128, 512, 4096])
@pytest.mark.parametrize("heavy_epilogue", [False, True])
def test_every_linear_candidate_runs_and_is_right_on_gpu(monkeypatch, dtype, m, heavy_epilogue):
    # Each candidate by itself (the tuner would silently skip one that fails to compile or launch).
    # The flags match test_linear_gelu_residual_on_gpu's calls, so most kernels are compiled already.
    k, n = 2048, 768
    x, w = make((m, k), dtype, "cuda"), make_weight(n, k, dtype, "cuda")
    b, r, activation = (make(n, dtype, "cuda"), make((m, n), dtype, "cuda"), "gelu") if heavy_epilogue else (None,) * 3
    want = formula(x, w, b, activation, r)
    autotune_cache.set_frozen(True)  # frozen: the only candidate runs, untimed
    bucket = autotune_cache.bucket_m(m)
    for config in linear_module.linear_configs(bucket, n, k, x.element_size(), heavy_epilogue):
        monkeypatch.setattr(linear_module, "linear_configs", lambda *args, c=config: [c])
        y = linear(x, w, b, activation=activation, residual=r)
        assert rel_err(y, want) < GPU_TOL[dtype], config
        monkeypatch.undo()


@pytest.mark.gpu
@pytest.mark.parametrize("epilogue", ["bias", "gelu_residual"])
def test_every_split_k_candidate_is_right_on_gpu(run_config, epilogue):
    # BERT's FFN down projection at 128 tokens: few tiles, long K, the case split-K is for.
    m, k, n, dtype = 128, 3072, 768, torch.float16
    x, w, b = make((m, k), dtype, "cuda"), make_weight(n, k, dtype, "cuda"), make(n, dtype, "cuda")
    activation, r = ("gelu", make((m, n), dtype, "cuda")) if epilogue == "gelu_residual" else (None, None)
    r32 = r.float() if r is not None else None
    want = linear_reference(x.float(), w.float(), b.float(), activation=activation, residual=r32)
    heavy_epilogue = epilogue != "bias"
    split = [c for c in linear_module.linear_configs(128, n, k, 2, heavy_epilogue) if c.get("SPLIT_K", 1) > 1]
    assert split
    for config in split:
        y = run_config(config, x, w, b, activation=activation, residual=r)
        assert rel_err(y, want) < GPU_TOL[dtype], config


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_autotune")
def test_linear_tunes_once_per_key_on_gpu():
    autotune_cache.reset_stats()
    x, w = make((100, 768), torch.float16, "cuda"), make_weight(768, 768, torch.float16, "cuda")
    linear(x, w)
    first = autotune_cache.stats()
    assert first["tunings"] == 1 and first["benchmarks_run"] >= 2 and first["failed_candidates"] == 0
    linear(make((120, 768), torch.float16, "cuda"), w)  # same M bucket (128): no new tuning
    assert autotune_cache.stats()["benchmarks_run"] == first["benchmarks_run"]


def test_cublas_candidate_only_for_half_precision():
    assert {linear_module.CUBLAS: 1} in linear_module.linear_configs(4096, 768, 768, 2, True)
    assert all(linear_module.CUBLAS not in c for c in linear_module.linear_configs(4096, 768, 768, 4, True))


@pytest.mark.parametrize(
    "with_bias, activation, with_residual, transposed",
    [(False, None, False, False), (True, None, False, False), (True, "gelu", True, False), (True, "silu", False, True)]
    + [(True, act, False, False) for act in ("relu", "gelu_tanh", "tanh")]
    + [(False, "gelu_tanh", True, False)],
)
def test_cublas_candidate_matches_reference(run_config, with_bias, activation, with_residual, transposed):
    # fp32 on CPU runs the same torch calls as fp16 on a GPU: the epilogue order is what is checked.
    x = make((2, 7, 48), torch.float32)
    w = make_weight(48, 40, torch.float32) if transposed else make_weight(40, 48, torch.float32)
    b = make(40, torch.float32) if with_bias else None
    r = make((2, 7, 40), torch.float32) if with_residual else None
    y = run_config({linear_module.CUBLAS: 1}, x, w, b, activation=activation, residual=r, weight_transposed=transposed)
    want = formula(x, w, b, activation, r, transposed=transposed)
    assert rel_err(y, want) < TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_autotune")
@pytest.mark.parametrize("activation", ["gelu_tanh", "relu", "gelu"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_cublas_candidate_epilogues_on_gpu(run_config, activation, with_residual):
    # gelu_tanh and relu go through cuBLASLt's fused bias+activation epilogue; gelu runs in place after it.
    m, k, n, dtype = 512, 768, 3072, torch.float16
    x, w, b = make((m, k), dtype, "cuda"), make_weight(n, k, dtype, "cuda"), make(n, dtype, "cuda")
    r = make((m, n), dtype, "cuda") if with_residual else None
    y = run_config({linear_module.CUBLAS: 1}, x, w, b, activation=activation, residual=r)
    assert rel_err(y, formula(x, w, b, activation, r)) < GPU_TOL[dtype]
