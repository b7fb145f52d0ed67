"""Decode attention's combine inside phase 1 (the last split to arrive combines) against the two-launch path and
the references: counters reset between calls, inactive splits and empty rows, the fallback without counters,
and the KERNL_DECODE_ONE_LAUNCH switch. Under the interpreter the programs run one after the other, so the
arrival order differs from a GPU's, but every program still counts and exactly one combines."""

import os
import subprocess
import sys

import pytest
import torch

from kernl.kernels import _arrival_counters
from kernl.kernels import _decode_attention_kernel as dk
from kernl.kernels._decode_attention_kernel import DecodeConfig, launch_decode_attention
from kernl.kernels.decode_attention import decode_attention, decode_attention_append
from tests.kernels.helpers import rel_err
from tests.kernels.test_decode_attention import TOL, check, make_inputs, poison

# The same partials combined by the same helper: the two paths differ at most by fp32 summation order, which
# can move an fp16 result by one rounding step.
AGREE = {torch.float32: 1e-6, torch.float16: 1e-3}


@pytest.fixture
def combine_launches(monkeypatch):
    """Counts launches of phase 2 (decode_combine_kernel)."""
    launches = []
    real = dk.decode_combine_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(dk, "decode_combine_kernel", Spy())
    return launches


def counters_zero(device: torch.device) -> bool:
    buffer = _arrival_counters._buffers.get(device)
    return buffer is not None and bool((buffer == 0).all())


def test_calls_in_a_row_reset_the_counters(poisoned_empty, combine_launches):
    """Different lengths and positions, plain and with append, on the same counters: each call matches the
    reference and leaves every counter at zero."""
    dtype, batch, heads_q, heads_kv, head_dim, max_len = torch.float16, 3, 4, 2, 32, 64
    cfg = DecodeConfig(16, 4, 4, 1)
    for lengths in ([64, 1, 30], [17, 64, 0], [5, 48, 33], [64, 64, 64]):
        q, k_cache, v_cache, lens = make_inputs(batch, heads_q, heads_kv, head_dim, max_len, lengths, dtype)
        out = launch_decode_attention(q, k_cache, v_cache, lens, None, None, head_dim**-0.5, cfg, one_launch=True)
        check(out, q, k_cache, v_cache, lens, TOL[dtype])
        assert counters_zero(q.device)
    for positions in ([0, 40, 63], [20, -1, 7]):
        keys, values = torch.randn(2, batch, heads_kv, max_len, head_dim, dtype=dtype).unbind(0)
        k_cache, v_cache = keys.clone(), values.clone()
        pos = torch.tensor(positions, dtype=torch.int32)
        poison(k_cache, v_cache, pos)  # the cache holds [0, pos); the kernel writes pos
        q = torch.randn(batch, heads_q, head_dim, dtype=dtype)
        rows = torch.arange(batch)
        k_new, v_new = keys[rows, :, pos.long()], values[rows, :, pos.long()]
        out = launch_decode_attention(q, k_cache, v_cache, pos, k_new, v_new, head_dim**-0.5, cfg, one_launch=True)
        check(out, q, keys, values, (pos.long() + 1).clamp(0, max_len), TOL[dtype])
        assert counters_zero(q.device)
    assert combine_launches == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_of_different_lengths_leave_splits_inactive(poisoned_empty, combine_launches, dtype):
    """8 splits of 16 positions at most: rows of 0, 1, 17, 100 and 128 positions have 0, 1, 2, 7 and 8 active
    splits; the inactive ones must neither count nor be combined (their workspace is NaN)."""
    lengths = [0, 1, 17, 100, 128]
    q, k_cache, v_cache, lens = make_inputs(5, 8, 2, 64, 128, lengths, dtype, rows=6)
    cfg = DecodeConfig(16, 8, 4, 1)
    out = launch_decode_attention(q, k_cache, v_cache, lens, None, None, 0.125, cfg, one_launch=True)
    assert (out[0] == 0).all()
    check(out, q, k_cache, v_cache, lens, TOL[dtype], scale=0.125)
    assert counters_zero(q.device) and combine_launches == []


CASES = [
    # (dtype, batch, heads_q, heads_kv, head_dim, max_len, lengths, config)
    (torch.float16, 1, 8, 2, 128, 300, [300], DecodeConfig(16, 16, 4, 1)),  # more splits than one row needs
    (torch.float16, 2, 6, 1, 80, 90, [90, 45], DecodeConfig(16, 4, 4, 1)),  # group 6, head_dim padded
    (torch.float32, 4, 4, 4, 64, 70, [70, 3, 0, 33], DecodeConfig(32, 2, 4, 1)),  # group 1, an empty row
    (torch.float16, 3, 16, 2, 64, 128, [128, 7, 64], None),  # the default config
]


@pytest.mark.parametrize("dtype, batch, heads_q, heads_kv, head_dim, max_len, lengths, cfg", CASES)
def test_one_launch_matches_two_launches(poisoned_empty, combine_launches, dtype, batch, heads_q, heads_kv,
                                         head_dim, max_len, lengths, cfg):  # fmt: skip
    q, k_cache, v_cache, lens = make_inputs(batch, heads_q, heads_kv, head_dim, max_len, lengths, dtype)
    scale = head_dim**-0.5
    one = launch_decode_attention(q, k_cache, v_cache, lens, None, None, scale, cfg, one_launch=True)
    assert combine_launches == []
    two = launch_decode_attention(q, k_cache, v_cache, lens, None, None, scale, cfg, one_launch=False)
    assert len(combine_launches) == 1
    check(one, q, k_cache, v_cache, lens, TOL[dtype])
    check(two, q, k_cache, v_cache, lens, TOL[dtype])
    assert rel_err(one, two) < AGREE[dtype]


def test_append_one_launch_matches_two_launches(poisoned_empty, combine_launches):
    dtype, batch, heads_q, heads_kv, head_dim, max_len = torch.float16, 3, 8, 2, 64, 96
    q, k_cache, v_cache, _ = make_inputs(batch, heads_q, heads_kv, head_dim, max_len, [96, 96, 96], dtype)
    k_cache, v_cache = k_cache.nan_to_num(), v_cache.nan_to_num()
    k_new, v_new = torch.randn(2, batch, heads_kv, head_dim, dtype=dtype).unbind(0)
    positions = torch.tensor([95, 0, 50], dtype=torch.int32)
    cfg = DecodeConfig(16, 8, 4, 1)
    k2, v2 = k_cache.clone(), v_cache.clone()
    one = launch_decode_attention(q, k_cache, v_cache, positions, k_new, v_new, 0.2, cfg, one_launch=True)
    two = launch_decode_attention(q, k2, v2, positions, k_new, v_new, 0.2, cfg, one_launch=False)
    assert len(combine_launches) == 1
    assert torch.equal(k_cache, k2) and torch.equal(v_cache, v2)
    check(one, q, k_cache, v_cache, positions + 1, TOL[dtype], scale=0.2)
    assert rel_err(one, two) < AGREE[dtype]


def test_without_counters_falls_back_to_two_launches(poisoned_empty, combine_launches, monkeypatch):
    """A capture that finds no counters large enough gets None and runs phase 2: the output is still right."""
    monkeypatch.setattr(dk, "arrival_counters", lambda device, count: None)
    q, k_cache, v_cache, lens = make_inputs(2, 4, 2, 32, 64, [64, 9], torch.float32)
    out = launch_decode_attention(q, k_cache, v_cache, lens, None, None, 32**-0.5, DecodeConfig(16, 4, 4, 1))
    assert len(combine_launches) == 1
    check(out, q, k_cache, v_cache, lens, TOL[torch.float32])


def test_the_module_switch_picks_the_path(combine_launches, monkeypatch):
    q, k_cache, v_cache, lens = make_inputs(1, 8, 2, 64, 256, [200], torch.float16)
    monkeypatch.setattr(dk, "ONE_LAUNCH", True)
    first = decode_attention(q, k_cache, v_cache, lens)
    assert combine_launches == []
    monkeypatch.setattr(dk, "ONE_LAUNCH", False)
    second = decode_attention(q, k_cache, v_cache, lens)
    assert len(combine_launches) == 1  # the interpreter's config splits this shape
    assert rel_err(first, second) < AGREE[torch.float16]
    k_new, v_new = torch.randn(2, 1, 2, 64, dtype=torch.float16).unbind(0)
    decode_attention_append(q, k_cache, v_cache, k_new, v_new, lens)
    assert len(combine_launches) == 2


def test_env_switch_is_read_at_import():
    code = "from kernl.kernels import _decode_attention_kernel as dk; print(dk.ONE_LAUNCH)"
    for value, want in (("0", "False"), ("1", "True")):
        env = {**os.environ, "KERNL_DECODE_ONE_LAUNCH": value, "TRITON_INTERPRET": "1"}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert done.stdout.strip() == want


def test_counter_buffer_grows_and_is_never_allocated_in_a_capture(monkeypatch):
    monkeypatch.setattr(_arrival_counters, "_buffers", {})
    monkeypatch.setattr(_arrival_counters, "_replaced", [])
    cpu = torch.device("cpu")
    small = _arrival_counters.arrival_counters(cpu, 8)
    assert small.dtype == torch.int32 and small.numel() >= 8 and (small == 0).all()
    assert _arrival_counters.arrival_counters(cpu, small.numel()) is small
    large = _arrival_counters.arrival_counters(cpu, small.numel() + 1)
    assert large.numel() > small.numel() and (large == 0).all()
    assert _arrival_counters._replaced == [small]  # kept alive for graphs that captured it
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _arrival_counters.arrival_counters(torch.device("cuda", 0), 8) is None
