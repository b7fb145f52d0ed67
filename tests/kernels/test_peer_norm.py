"""The fused sum over ranks + residual add + RMS norm: its kernel's arithmetic and its protocol (under Triton's
interpreter, a peer's side written by hand), and the unfused path it takes everywhere else."""

import pytest
import torch

from kernl.kernels import _peer_norm_kernel as k
from kernl.kernels import peer_norm
from kernl.kernels.collectives import ThreadRanks
from kernl.kernels.rms_norm import rms_norm_reference

EPS = 1e-6
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(partials, residual, weight, weight_offset=0.0):
    """What the kernel computes: the partials summed in fp32 (in an order of its own, the same on every rank) and
    rounded as an all-reduce's output, the residual added in fp32; y from that fp32 sum."""
    summed = sum(p.float() for p in partials).to(residual.dtype).float() + residual.float()
    y = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + EPS) * (weight.float() + weight_offset)
    return y.to(residual.dtype), summed.to(residual.dtype)


def _slot(memory: torch.Tensor, half: int, row: int, sender: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    start = ((half * k.SLOTS + row) * k.MAX_WORLD + sender) * k.ROW_CAP_BYTES
    return memory[start : start + n * torch.empty((), dtype=dtype).element_size()].view(dtype)


@pytest.mark.parametrize(("dtype", "rows", "n"), [(torch.bfloat16, 1, 256), (torch.float32, 3, 200)])
def test_one_rank_is_its_own_partial_plus_residual_normed_across_both_halves(dtype, rows, n):
    ws = peer_norm.Workspace.local(torch.device(DEVICE), dtype)
    weight = torch.randn(n, device=DEVICE).to(dtype)
    for use in range(3):  # halves 0, 1, 0 of every slot
        x = torch.randn(rows, n, device=DEVICE).to(dtype)
        residual = torch.randn(rows, n, device=DEVICE).to(dtype)
        y, total = peer_norm.launch(ws, x, residual, weight, EPS, 1.0)
        want_y, want_total = _reference([x], residual, weight, 1.0)
        torch.testing.assert_close(total, want_total, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)
        torch.testing.assert_close(y, want_y, rtol=2e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)
        assert ws.counters[:rows].tolist() == [use + 1] * rows
        assert int(ws.counters[rows:].abs().sum()) == 0


def test_a_one_rank_workspace_compiling_for_more_ranks_reads_their_tile_and_sums_its_own_row():
    """A compile's lone rank 0 runs the kernel its ranks will launch (a tile of 4 places for 3 or 4 ranks), over
    its own place only."""
    ws = peer_norm._local_workspace(torch.device(DEVICE), torch.bfloat16, 3)
    assert (ws.world, ws.tile_rows) == (1, 4)
    assert peer_norm.Workspace.local(torch.device(DEVICE), torch.bfloat16).tile_rows == 1
    x, residual = ((torch.randint(-16, 17, (1, 64), device=DEVICE) / 4).bfloat16() for _ in range(2))  # exact sums
    weight = torch.randn(64, device=DEVICE).bfloat16()
    y, total = peer_norm.launch(ws, x, residual, weight, EPS)
    want_y, want_total = _reference([x], residual, weight)
    assert torch.equal(total, want_total)
    torch.testing.assert_close(y, want_y, rtol=2e-2, atol=1e-5)


def _is_empty(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) == k.EMPTY_BITS[2]  # -0.0 in bf16


@pytest.mark.parametrize(("world", "rank", "n"), [(2, 0, 128), (4, 2, 128), (2, 1, 96)])
def test_a_rank_pushes_its_rows_waits_for_the_peers_and_empties_what_it_read(world, rank, n):
    """One rank's side of a call, with every peer's row written into its workspace as the peers' kernels would;
    a row narrower than the kernel's block (96 of 128) as well."""
    rows, dtype = 2, torch.bfloat16
    memories = [peer_norm.empty_places(torch.empty(k.WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), dtype)
                for _ in range(world)]  # fmt: skip
    bases = torch.tensor([m.data_ptr() for m in memories], dtype=torch.int64, device=DEVICE)
    ws = peer_norm.Workspace(bases, rank=rank, keep=memories)
    ws.counters[:rows] = 1  # each slot used once: this call is in half 1
    weight = torch.randn(n, device=DEVICE, dtype=dtype)
    # Quarters from -4 to 4: every sum is exact in bf16, whatever rounding the backend uses (the interpreter
    # truncates), so the total must match exactly.
    parts = [(torch.randint(-16, 17, (rows, n), device=DEVICE) / 4).to(dtype) for _ in range(world)]
    residual = (torch.randint(-16, 17, (rows, n), device=DEVICE) / 4).to(dtype)
    parts[rank][0, 0] = -0.0  # sent as +0.0: -0.0 marks an empty element
    own = memories[rank]
    for sender in range(world):
        if sender != rank:
            for row in range(rows):
                _slot(own, 1, row, sender, n, dtype).copy_(parts[sender][row])  # pushed by the sender
                _slot(own, 0, row, sender, n, dtype).fill_(1000.0)  # the other half: must not be read

    y, total = peer_norm.launch(ws, parts[rank], residual, weight, EPS)

    want_y, want_total = _reference(parts, residual, weight)
    assert torch.equal(total, want_total)
    torch.testing.assert_close(y, want_y, rtol=2e-2, atol=1e-5)
    assert ws.counters[:rows].tolist() == [2] * rows
    for row in range(rows):
        for peer in range(world):
            if peer == rank:
                mine = _slot(own, 1, row, rank, n, dtype)
                assert _is_empty(mine).all(), "the rank's own place was not emptied"
                continue
            sent = _slot(memories[peer], 1, row, rank, n, dtype)
            assert torch.equal(sent, parts[rank][row]) and not _is_empty(sent).any(), f"no whole row reached {peer}"
            assert _is_empty(_slot(own, 1, row, peer, n, dtype)).all(), f"the row from {peer} was not emptied"


def test_without_peers_the_op_is_the_rms_norm_of_the_sum():
    x, residual = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    weight = torch.randn(64)
    y, total = peer_norm.all_reduce_add_rms_norm(x.clone(), residual, weight, EPS)
    want_y, want_total = rms_norm_reference(x, weight, EPS, residual=residual)
    torch.testing.assert_close(total, want_total)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)


def test_ranks_as_threads_sum_through_the_collective(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter is not thread-safe: torch references
    parts = [torch.randn(1, 64) for _ in range(3)]
    residual, weight = torch.randn(1, 64), torch.randn(64)
    outs = ThreadRanks(3).run(lambda r: peer_norm.all_reduce_add_rms_norm(parts[r].clone(), residual, weight, EPS))
    want_y, want_total = rms_norm_reference(sum(parts), weight, EPS, residual=residual)
    for y, total in outs:
        torch.testing.assert_close(total, want_total, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "fits"),
    [((1, 4096), True), ((k.SLOTS, 4096), True), ((k.SLOTS + 1, 4096), False), ((1, 32768), False)],
)
def test_prefill_rows_and_wide_rows_stay_unfused(shape, fits):
    x = torch.empty(shape, dtype=torch.bfloat16, device=DEVICE)
    weight = torch.empty(shape[-1], dtype=torch.bfloat16, device=DEVICE)
    assert peer_norm.fusable(x, x, weight) is fits
