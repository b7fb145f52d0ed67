"""CUDA-graph replay: same results as the eagerly run program, fresh outputs, threads, shared memory pool."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import kernl
from kernl.runtime.program import storages
from tests.models import tiny_bert, token_inputs

TWELVE = [(b, s) for b in (1, 8, 32) for s in (32, 64, 128, 256)]


@pytest.fixture(scope="module")
def cuda_bundle(tmp_path_factory):
    model = tiny_bert(max_position_embeddings=256)
    path = kernl.compile(
        model, tmp_path_factory.mktemp("b") / "bert", buckets=TWELVE, device="cuda", dtype=torch.float16
    )
    return model.to("cuda", torch.float16), path


def _cuda(inputs):
    return {k: v.cuda() for k, v in inputs.items()}


@pytest.mark.gpu
def test_graph_replay_matches_eager_program(cuda_bundle):
    _, path = cuda_bundle
    graphs, eager = kernl.load(path), kernl.load(path, cuda_graphs=False)
    for batch, seq in [(1, 1), (3, 37), (8, 64), (17, 200), (32, 256)]:
        inputs = _cuda(token_inputs(batch, seq))
        got, want = graphs(**inputs), eager(**inputs)
        assert got.last_hidden_state.shape == (batch, seq, 32)
        assert torch.equal(got.last_hidden_state, want.last_hidden_state)
        assert torch.equal(got.pooler_output, want.pooler_output)


@pytest.mark.gpu
def test_outputs_are_not_overwritten_by_the_next_call(cuda_bundle):
    bundle = kernl.load(cuda_bundle[1])
    a_in, b_in = _cuda(token_inputs(2, 30)), _cuda(token_inputs(2, 30))
    a = bundle(**a_in).last_hidden_state
    a_copy = a.clone()
    bundle(**b_in)
    assert torch.equal(a, a_copy)


@pytest.mark.gpu
def test_threads_get_their_own_results(cuda_bundle):
    bundle = kernl.load(cuda_bundle[1])
    calls = [_cuda(token_inputs(b, s)) for b, s in [(1, 5), (4, 60), (8, 128), (2, 33)] * 4]
    want = [bundle(**c).last_hidden_state for c in calls]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda c: bundle(**c).last_hidden_state, calls))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def _reserved_by_load(path) -> int:
    torch.cuda.synchronize()
    # Loading clears torch's cached cuBLAS workspaces (see graphs.py): start both measurements without one.
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_reserved()
    bundle = kernl.load(path)
    torch.cuda.synchronize()
    used = torch.cuda.memory_reserved() - base
    del bundle
    torch.cuda.empty_cache()
    return used


@pytest.mark.gpu
def test_twelve_buckets_cost_about_one(cuda_bundle, tmp_path):
    model, path = cuda_bundle
    largest = kernl.compile(model, tmp_path / "one", buckets=[TWELVE[-1]], device="cuda")
    one, twelve = _reserved_by_load(largest), _reserved_by_load(path)
    print(f"reserved: 1 bucket {one / 2**20:.1f} MiB, 12 buckets {twelve / 2**20:.1f} MiB")
    # Separate pools would cost the sum of all twelve buckets' activations; one pool costs about the largest.
    # Plus at most one cuBLAS workspace (32 MiB on Hopper) in the pool, there as soon as any captured GEMM is
    # on cuBLAS: the tuner picks differ between the two builds (seen on an H100: 24 MiB against 56 MiB).
    assert twelve <= 1.5 * one + 8 * 2**20 + 32 * 2**20


@pytest.mark.gpu
def test_graphs_survive_torch_clearing_cublas_workspaces(tmp_path, monkeypatch):
    # Every linear on cuBLAS; then torch frees its cached workspaces (torch.compile's CUDA graphs do) and the
    # memory is reused: graphs that had recorded a shared workspace would replay into someone else's tensor.
    import importlib

    from kernl.kernels import autotune_cache

    linear_module = importlib.import_module("kernl.kernels.linear")  # the package exports a function of that name

    monkeypatch.setattr(linear_module, "linear_configs", lambda *args: [{linear_module.CUBLAS: 1}])
    saved = autotune_cache.export()
    autotune_cache.clear()
    try:
        model = tiny_bert(hidden_size=256, intermediate_size=1024)
        path = kernl.compile(model, tmp_path / "bert", buckets=[(8, 64)], device="cuda", dtype=torch.float16)
        graphs, eager = kernl.load(path), kernl.load(path, cuda_graphs=False)
        inputs = _cuda(token_inputs(8, 64))
        want = eager(**inputs).last_hidden_state
        torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
        clutter = [torch.full((1 << 22,), float("nan"), device="cuda") for _ in range(32)]  # 512 MB of NaN
        for _ in range(3):
            got = graphs(**inputs).last_hidden_state
            torch.cuda.synchronize()
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
        del clutter
    finally:
        autotune_cache.clear()
        autotune_cache.load(saved)
        autotune_cache.set_frozen(False)


@pytest.mark.gpu
@pytest.mark.parametrize("outside", [True, False])
def test_outputs_written_after_the_replay_are_not_copied(cuda_bundle, monkeypatch, outside):
    from kernl.runtime import graphs
    from tests.runtime.test_program_copies import _CountOps

    # The tiny model's outputs are small, so by default its graphs capture the tail: force each way.
    monkeypatch.setattr(graphs, "TAIL_OUTSIDE_BYTES", 0 if outside else 1 << 40)
    bundle = kernl.load(cuda_bundle[1])
    inputs = _cuda(token_inputs(8, 64))  # a bucket exactly: nothing to slice
    with _CountOps() as counted:
        out = bundle(**inputs)
    # One foreach copy fills the static inputs. Outside, the final norm and the pooler write fresh tensors:
    # no output copy. Inside, both outputs are copied out, in one more foreach launch.
    assert counted.ops["aten.clone.default"] == 0, counted.ops
    assert counted.ops["aten._foreach_copy_.default"] == (1 if outside else 2), counted.ops
    graph_memory = bundle._runner.graphs.graph_memory[(8, 64)]
    assert not storages([out.pooler_output, out.last_hidden_state]) & graph_memory
    want = kernl.load(cuda_bundle[1], cuda_graphs=False)(**inputs)
    assert torch.equal(out.pooler_output, want.pooler_output)
    assert torch.equal(out.last_hidden_state, want.last_hidden_state)
