"""layer_norm and rms_norm against their references and against an independent fp64 formula."""

import pytest
import torch

from kernl.kernels import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from tests.kernels.helpers import rel_err

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def formula(x, w, b, eps, residual, rms, offset=0.0):
    """The textbook definition in fp64, written independently of the kernels and references."""
    t = x.double() + (residual.double() if residual is not None else 0)
    if not rms:
        t_c = t - t.mean(-1, keepdim=True)
    else:
        t_c = t
    y = t_c / torch.sqrt(t_c.pow(2).mean(-1, keepdim=True) + eps) * (w.double() + offset)
    if b is not None:
        y = y + b.double()
    return y, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64), (7, 37), (2, 3, 129), (5, 1023)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm_matches_reference_and_formula(dtype, shape, with_residual):
    x = torch.randn(shape, dtype=dtype) * 3 + 1
    w, b = torch.randn(shape[-1], dtype=dtype), torch.randn(shape[-1], dtype=dtype)
    residual = torch.randn(shape, dtype=dtype) if with_residual else None
    out = layer_norm(x, w, b, 1e-5, residual=residual)
    ref = layer_norm_reference(x, w, b, 1e-5, residual=residual)
    want_y, want_sum = formula(x, w, b, 1e-5, residual, rms=False)
    y, total = out if with_residual else (out, None)
    y_ref = ref[0] if with_residual else ref
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(y, want_y) < TOL[dtype]
    if with_residual:
        assert rel_err(total, want_sum) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 64), (7, 37), (2, 2, 257)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference_and_formula(dtype, shape, offset, with_residual):
    x = torch.randn(shape, dtype=dtype)
    w = torch.randn(shape[-1], dtype=dtype)
    residual = torch.randn(shape, dtype=dtype) if with_residual else None
    out = rms_norm(x, w, 1e-6, residual=residual, weight_offset=offset)
    ref = rms_norm_reference(x, w, 1e-6, residual=residual, weight_offset=offset)
    want_y, want_sum = formula(x, w, None, 1e-6, residual, rms=True, offset=offset)
    y, total = out if with_residual else (out, None)
    assert rel_err(y, ref[0] if with_residual else ref) < TOL[dtype]
    assert rel_err(y, want_y) < TOL[dtype]
    if with_residual:
        assert rel_err(total, want_sum) < TOL[dtype]


def test_layer_norm_reads_strided_rows():
    base = torch.randn(6, 80)
    x = base[:, :48]  # rows 80 apart: a view, not a copy
    w, b = torch.randn(48), torch.randn(48)
    assert rel_err(layer_norm(x, w, b, 1e-5), formula(x, w, b, 1e-5, None, rms=False)[0]) < 1e-5


def test_custom_ops_are_registered():
    x, w, b, r = torch.randn(4, 64), torch.randn(64), torch.randn(64), torch.randn(4, 64)
    y, total = torch.ops.kernl.add_layer_norm(x, r, w, b, 1e-5)
    assert rel_err(y, formula(x, w, b, 1e-5, r, rms=False)[0]) < 1e-5
    assert rel_err(torch.ops.kernl.rms_norm(x, w, 1e-6), formula(x, w, None, 1e-6, None, rms=True)[0]) < 1e-5


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(x=torch.randn(4, 8), weight=torch.randn(9)), "weight"),
        (dict(x=torch.randint(0, 3, (4, 8)), weight=torch.randn(8)), "x"),
        (dict(x=torch.randn(4, 8), weight=torch.randn(8), residual=torch.randn(4, 9)), "residual"),
        (dict(x=torch.randn(4, 8), weight=torch.randn(8), residual=torch.randn(4, 8).half()), "residual"),
        (dict(x=torch.randn(2, 20000), weight=torch.randn(20000)), "x"),
    ],
)
def test_bad_input_names_the_argument(kwargs, name):
    x, w = kwargs.pop("x"), kwargs.pop("weight")
    with pytest.raises(ValueError, match=f"^{name}:"):
        layer_norm(x, w, None, 1e-5, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, hidden", [(1, 768), (4096, 768), (128, 2048), (37, 4096), (8, 16384)])
def test_norms_on_gpu(dtype, rows, hidden):
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    r = torch.randn_like(x)
    w, b = torch.randn(hidden, device="cuda", dtype=dtype), torch.randn(hidden, device="cuda", dtype=dtype)
    y, total = layer_norm(x, w, b, 1e-5, residual=r)
    assert rel_err(y, formula(x, w, b, 1e-5, r, rms=False)[0]) < TOL[dtype]
    assert rel_err(total, x.double() + r.double()) < TOL[dtype]
    y = rms_norm(x, w, 1e-6, residual=r)[0]
    assert rel_err(y, formula(x, w, None, 1e-6, r, rms=True)[0]) < TOL[dtype]
