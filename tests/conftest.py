"""Test setup: Triton's interpreter on machines without CUDA, and the gpu marker."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before kernl's kernels are imported: @triton.jit reads it at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernl.kernels import register_ops  # noqa: E402 - after TRITON_INTERPRET: @triton.jit reads it

register_ops()  # tests call torch.ops.kernl.* directly


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; runs on a GPU machine through scripts/gpu-check")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def cpu_references():
    """For a module: CPU kernels run through their plain-torch references instead of Triton's interpreter
    (runs_triton reads TRITON_INTERPRET at each call). For tests of logic above the kernels, which
    tests/kernels checks under the interpreter."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    yield
    if old is None:
        os.environ.pop("TRITON_INTERPRET")
    else:
        os.environ["TRITON_INTERPRET"] = old


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_bert_bundle(tmp_path_factory):
    """A tiny BERT and its CPU bundle with two buckets, built once for the tests that only read it."""
    import kernl
    from tests.models import tiny_bert

    model = tiny_bert()
    path = kernl.compile(model, tmp_path_factory.mktemp("bundles") / "bert", buckets=[(2, 16), (4, 32)], device="cpu")
    return model, path
