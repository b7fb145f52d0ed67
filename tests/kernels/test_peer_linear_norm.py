"""The row-parallel linear + sum over ranks + residual add + RMS norm: the GEMV that stores its rows straight into
every rank's places and the norm kernel that reads them (under Triton's interpreter, the peers' side written by
hand), and the two ops it stands for everywhere else."""

import pytest
import torch

from kernl.kernels import _peer_norm_kernel as k
from kernl.kernels import peer_linear_norm, peer_norm
from kernl.kernels._gemv import gemv_configs
from kernl.kernels.collectives import ThreadRanks
from kernl.kernels.linear import linear_reference
from kernl.kernels.rms_norm import rms_norm_reference
from tests.kernels.test_peer_norm import DEVICE, EPS, _is_empty, _reference, _slot


def _pushed_call(ws, x, weight, residual, norm_weight, weight_offset=0.0):
    """The fused path as the op takes it on GPUs: the GEMV pushes, the norm kernel reads every rank's place."""
    config = gemv_configs(1, weight.shape[0], weight.shape[1])[0]
    config = {**config, "BLOCK_M": max(1, 1 << (x.shape[0] - 1).bit_length())}  # the kernel takes any M <= BLOCK_M
    peer_linear_norm._launch_push(x, weight, ws, config)
    return peer_norm.launch(ws, None, residual, norm_weight, EPS, weight_offset)


@pytest.mark.parametrize(("dtype", "rows", "k_in", "n"), [(torch.bfloat16, 1, 96, 128), (torch.float32, 3, 64, 72)])
def test_one_rank_is_its_linear_plus_residual_normed_across_both_halves(dtype, rows, k_in, n):
    ws = peer_norm.Workspace.local(torch.device(DEVICE), dtype)
    weight = (torch.randn(n, k_in, device=DEVICE) / k_in**0.5).to(dtype)
    norm_weight = torch.randn(n, device=DEVICE).to(dtype)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype != torch.float32 else {"rtol": 1e-4, "atol": 1e-5}
    for use in range(3):  # halves 0, 1, 0 of every slot
        x = torch.randn(rows, k_in, device=DEVICE).to(dtype)
        residual = torch.randn(rows, n, device=DEVICE).to(dtype)
        y, total = _pushed_call(ws, x, weight, residual, norm_weight, 1.0)
        want_y, want_total = _reference([linear_reference(x, weight)], residual, norm_weight, 1.0)
        torch.testing.assert_close(total, want_total, **tol)
        torch.testing.assert_close(y, want_y, **tol)
        assert ws.counters[:rows].tolist() == [use + 1] * rows
        for half in (0, 1):  # the place this call filled was read and emptied; the other was never written
            assert all(_all_empty(_slot(ws._keep, half, row, 0, n, dtype)) for row in range(rows))


def _all_empty(t: torch.Tensor) -> bool:
    bits = torch.int16 if t.element_size() == 2 else torch.int32
    return bool((t.view(bits) == k.EMPTY_BITS[t.element_size()]).all())


@pytest.mark.parametrize(("world", "rank"), [(2, 1), (4, 2)])
def test_the_gemv_stores_its_rows_in_every_rank_and_the_norm_empties_what_it_read(world, rank):
    """One rank's side of a call: its GEMV's rows reach every rank's place (its own included), the peers' rows
    are written by hand as their GEMVs would, and the norm sums all of them."""
    n, k_in, rows, dtype = 64, 32, 2, torch.bfloat16
    memories = [peer_norm.empty_places(torch.empty(k.WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), dtype)
                for _ in range(world)]  # fmt: skip
    bases = torch.tensor([m.data_ptr() for m in memories], dtype=torch.int64, device=DEVICE)
    ws = peer_norm.Workspace(bases, rank=rank, keep=memories)
    ws.counters[:rows] = 3  # each slot used three times: this call is in half 1
    # Small integers and quarters: the products and sums are exact in bf16, so the rows must match bit for bit.
    x = torch.randint(-2, 3, (rows, k_in), device=DEVICE).to(dtype)
    weight = (torch.randint(-2, 3, (n, k_in), device=DEVICE) / 4).to(dtype)
    mine = linear_reference(x, weight)
    parts = [(torch.randint(-16, 17, (rows, n), device=DEVICE) / 4).to(dtype) for _ in range(world)]
    parts[rank] = mine
    residual = (torch.randint(-16, 17, (rows, n), device=DEVICE) / 4).to(dtype)
    norm_weight = torch.randn(n, device=DEVICE, dtype=dtype)
    own = memories[rank]
    for sender in range(world):
        if sender != rank:
            for row in range(rows):
                _slot(own, 1, row, sender, n, dtype).copy_(parts[sender][row])
                _slot(own, 0, row, sender, n, dtype).fill_(1000.0)  # the other half: must not be read

    y, total = _pushed_call(ws, x, weight, residual, norm_weight)

    want_y, want_total = _reference(parts, residual, norm_weight)
    assert torch.equal(total, want_total)
    torch.testing.assert_close(y, want_y, rtol=2e-2, atol=1e-5)
    assert ws.counters[:rows].tolist() == [4] * rows
    for row in range(rows):
        for peer in range(world):
            if peer != rank:
                sent = _slot(memories[peer], 1, row, rank, n, dtype)
                assert torch.equal(sent, mine[row]) and not _is_empty(sent).any(), f"no whole row reached {peer}"
                assert _is_empty(_slot(memories[peer], 0, row, rank, n, dtype)).all(), "written into the wrong half"
            assert _is_empty(_slot(own, 1, row, peer, n, dtype)).all(), f"the row from {peer} was not emptied"


def test_without_peers_the_op_is_the_linear_then_the_rms_norm_of_the_sum():
    x, weight = torch.randn(2, 3, 48), torch.randn(64, 48) / 7
    residual, norm_weight = torch.randn(2, 3, 64), torch.randn(64)
    y, total = peer_linear_norm.linear_all_reduce_add_rms_norm(x, weight, False, residual, norm_weight, EPS)
    want_y, want_total = rms_norm_reference(linear_reference(x, weight), norm_weight, EPS, residual=residual)
    torch.testing.assert_close(total, want_total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-5)


def test_a_transposed_weight_takes_the_two_ops():
    x, weight = torch.randn(1, 48), torch.randn(48, 64) / 7  # [in, out], as GPT-2's Conv1D stores it
    residual, norm_weight = torch.randn(1, 64), torch.randn(64)
    y, total = peer_linear_norm.linear_all_reduce_add_rms_norm(x, weight, True, residual, norm_weight, EPS)
    want_y, want_total = rms_norm_reference(x @ weight, norm_weight, EPS, residual=residual)
    torch.testing.assert_close(total, want_total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-5)


def test_ranks_as_threads_sum_their_linears_through_the_collective(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter is not thread-safe: torch references
    xs = [torch.randn(1, 32) for _ in range(3)]
    weights = [torch.randn(64, 32) / 6 for _ in range(3)]
    residual, norm_weight = torch.randn(1, 64), torch.randn(64)
    outs = ThreadRanks(3).run(
        lambda r: peer_linear_norm.linear_all_reduce_add_rms_norm(xs[r], weights[r], False, residual, norm_weight, EPS)
    )
    partial = sum(x @ w.t() for x, w in zip(xs, weights))
    want_y, want_total = rms_norm_reference(partial, norm_weight, EPS, residual=residual)
    for y, total in outs:
        torch.testing.assert_close(total, want_total, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-4)
