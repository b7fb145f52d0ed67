"""decode_attention, cache_append and the fused decode_attention_append against their references and an
independent fp64 formula; NaN in the cache past each row's length, poisoned outputs and workspaces; on GPU,
torch SDPA's own error and replays of one captured CUDA graph with new lengths."""

import pytest
import torch
import torch.nn.functional as F

from kernl.kernels.decode_attention import (
    cache_append,
    cache_append_reference,
    decode_attention,
    decode_attention_append,
    decode_attention_reference,
)
from tests.kernels.helpers import rel_err

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# The CPU tests run the kernels through Triton's interpreter, whose tl.dot gives garbage for bf16 operands
# (Triton 3.9): bf16 runs in the GPU tests only.
CPU_DTYPES = [torch.float32, torch.float16]


def formula(q, k_cache, v_cache, lengths, scale=None):
    """fp64, one (row, head) at a time: kv head by index, only the first lengths[b] positions, 0 if none."""
    batch, heads_q, head_dim = q.shape
    heads_kv, max_len = k_cache.shape[1], k_cache.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        n = min(max(int(lengths[b]), 0), max_len)
        for h in range(heads_q):
            kv = h * heads_kv // heads_q
            k, v = k_cache[b, kv, :n].double().cpu(), v_cache[b, kv, :n].double().cpu()
            if n:
                out[b, h] = torch.softmax(k @ q[b, h].double().cpu() * scale, 0) @ v
    return out


def make_inputs(batch, heads_q, heads_kv, head_dim, max_len, lengths, dtype, rows=None, device="cpu"):
    """q, caches of `rows` rows holding NaN past each row's length (and in rows past the batch), lengths."""
    rows = rows or batch
    q = torch.randn(batch, heads_q, head_dim, dtype=dtype, device=device)
    k_cache = torch.randn(rows, heads_kv, max_len, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn(rows, heads_kv, max_len, head_dim, dtype=dtype, device=device)
    lengths = torch.tensor(lengths, dtype=torch.int32, device=device)
    poison(k_cache, v_cache, lengths)
    return q, k_cache, v_cache, lengths


def poison(k_cache, v_cache, lengths):
    """NaN at every position a row does not hold: if the kernel read one, the output would show it."""
    max_len = k_cache.shape[2]
    past = torch.arange(max_len, device=k_cache.device)[None, :] >= lengths.long().clamp(0, max_len)[:, None]
    past = torch.cat([past, past.new_ones(k_cache.shape[0] - past.shape[0], max_len)])
    k_cache.masked_fill_(past[:, None, :, None], float("nan"))
    v_cache.masked_fill_(past[:, None, :, None], float("nan"))


def check(out, q, k_cache, v_cache, lengths, tol, scale=None):
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    assert rel_err(out, decode_attention_reference(q, k_cache, v_cache, lengths, scale)) < tol
    assert rel_err(out.cpu(), formula(q, k_cache, v_cache, lengths, scale)) < tol


# (dtype, batch, heads_q, heads_kv, head_dim, max_len, lengths): GQA ratios 4, 8 and 1, head_dim 128, 64 and 80
# (padded to 128 in the kernel), odd lengths, rows of one batch at different lengths. Each case runs in one
# dtype, or two: every tile costs tens of milliseconds in the interpreter.
CASES = [
    (torch.float16, 4, 4, 1, 128, 1024, [1023, 1, 7, 37]),
    (torch.float32, 2, 8, 1, 64, 64, [37, 64]),
    (torch.float16, 3, 2, 2, 80, 40, [7, 40, 1]),
]


@pytest.mark.parametrize("dtype, batch, heads_q, heads_kv, head_dim, max_len, lengths", CASES)
def test_matches_reference_and_formula(poisoned_empty, dtype, batch, heads_q, heads_kv, head_dim, max_len, lengths):
    q, k_cache, v_cache, lens = make_inputs(batch, heads_q, heads_kv, head_dim, max_len, lengths, dtype)
    out = decode_attention(q, k_cache, v_cache, lens)
    check(out, q, k_cache, v_cache, lens, TOL[dtype])


@pytest.mark.parametrize("block_n, splits", [(16, 1), (32, 2), (16, 16)])
def test_split_counts_and_tiles(poisoned_empty, block_n, splits):
    """One split (no workspace), a few, and more splits than the rows have tiles (most of them idle)."""
    from kernl.kernels._decode_attention_kernel import DecodeConfig, launch_decode_attention

    q, k_cache, v_cache, lens = make_inputs(3, 4, 1, 64, 100, [100, 1, 37], torch.float32, rows=5)
    out = launch_decode_attention(q, k_cache, v_cache, lens, None, None, 64**-0.5, DecodeConfig(block_n, splits, 4, 1))
    check(out, q, k_cache, v_cache, lens, TOL[torch.float32])


def test_length_zero_gives_zeros_and_lengths_clamp_to_the_cache(poisoned_empty):
    q, k_cache, v_cache, _ = make_inputs(3, 4, 2, 64, 24, [24, 24, 24], torch.float16)
    lens = torch.tensor([0, 1000, 5], dtype=torch.int64)
    poison(k_cache, v_cache, lens)
    out = decode_attention(q, k_cache, v_cache, lens, scale=0.3)
    assert (out[0] == 0).all()
    check(out, q, k_cache, v_cache, torch.tensor([0, 24, 5]), TOL[torch.float16], scale=0.3)


def test_cache_append_writes_each_row_at_its_position():
    k_cache, v_cache = torch.randn(2, 5, 3, 12, 64, dtype=torch.float16).unbind(0)  # 5 rows, batch of 4
    k_new, v_new = torch.randn(2, 4, 3, 64, dtype=torch.float16).unbind(0)
    positions = torch.tensor([0, 7, 11, -1], dtype=torch.int32)  # -1: an idle row, nothing written
    want_k, want_v = k_cache.clone(), v_cache.clone()
    cache_append_reference(want_k, want_v, k_new, v_new, positions)
    cache_append(k_cache, v_cache, k_new, v_new, positions)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    assert torch.equal(k_cache[2, :, 11], k_new[2]) and torch.equal(v_cache[1, :, 7], v_new[1])
    positions = torch.tensor([12, 100, 3, 2], dtype=torch.int64)  # past the cache: nothing written
    cache_append(k_cache, v_cache, k_new, v_new, positions)
    cache_append_reference(want_k, want_v, k_new, v_new, positions)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    assert torch.equal(v_cache[2, :, 3], v_new[2])


def test_decode_steps_with_fused_append(poisoned_empty):
    """Rows at different positions generate a few tokens: each step writes k, v at the row's position and
    attends over [0, position], as the same steps computed with the whole sequence at once."""
    dtype, batch, heads_q, heads_kv, head_dim, max_len = torch.float16, 3, 4, 2, 64, 40
    starts = torch.tensor([0, 5, 33])
    keys = torch.randn(batch, heads_kv, max_len, head_dim, dtype=dtype)
    values = torch.randn(batch, heads_kv, max_len, head_dim, dtype=dtype)
    k_cache, v_cache = keys.clone(), values.clone()
    poison(k_cache, v_cache, starts)  # the prompt (positions < start) is in the cache, the rest unwritten
    for step in range(2):
        positions = (starts + step).to(torch.int32)
        q = torch.randn(batch, heads_q, head_dim, dtype=dtype)
        rows = torch.arange(batch)
        k_new, v_new = keys[rows, :, positions.long()], values[rows, :, positions.long()]
        out = decode_attention_append(q, k_cache, v_cache, k_new, v_new, positions)
        check(out, q, keys, values, positions + 1, TOL[dtype])
        for b, pos in enumerate(positions.tolist()):  # the cache now holds the sequence up to pos, no more
            assert torch.equal(k_cache[b, :, : pos + 1], keys[b, :, : pos + 1])
            assert torch.equal(v_cache[b, :, : pos + 1], values[b, :, : pos + 1])
            assert torch.isnan(k_cache[b, :, pos + 1 :]).all() and torch.isnan(v_cache[b, :, pos + 1 :]).all()


def test_fused_append_idle_rows_and_positions_past_the_cache(poisoned_empty):
    q, k_cache, v_cache, _ = make_inputs(3, 4, 2, 64, 20, [20, 20, 9], torch.float32)
    k_new, v_new = torch.randn(2, 3, 2, 64).unbind(0)
    positions = torch.tensor([-1, 20, 9], dtype=torch.int32)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    out = decode_attention_append(q, k_cache, v_cache, k_new, v_new, positions)
    assert (out[0] == 0).all()  # idle row: zeros, nothing written
    assert torch.equal(k_cache[:2], before_k[:2]) and torch.equal(v_cache[:2], before_v[:2])
    assert torch.equal(k_cache[2, :, 9], k_new[2]) and torch.equal(v_cache[2, :, 9], v_new[2])
    check(out, q, k_cache, v_cache, torch.tensor([0, 20, 10]), TOL[torch.float32])


def test_strided_views():
    """q from a fused QKV projection; the caches as one layer of a [layers, rows, ...] buffer with more rows
    than the batch, and as a position-major [rows, max_len, heads_kv, head_dim] buffer."""
    batch, heads_q, heads_kv, head_dim, max_len = 2, 4, 2, 32, 20
    fused = torch.randn(batch, (heads_q + 2 * heads_kv) * head_dim, dtype=torch.float16)
    q = fused[:, : heads_q * head_dim].view(batch, heads_q, head_dim)
    lens = torch.tensor([20, 11], dtype=torch.int32)
    layers = torch.randn(2, 3, 4, heads_kv, max_len, head_dim, dtype=torch.float16)
    k_cache, v_cache = layers[1, 0], layers[1, 1]
    assert not q.is_contiguous() and k_cache.shape[0] > batch
    check(decode_attention(q, k_cache, v_cache, lens), q, k_cache, v_cache, lens, TOL[torch.float16])
    k_cache, v_cache = torch.randn(2, batch, max_len, heads_kv, head_dim, dtype=torch.float16).transpose(2, 3).unbind(0)
    check(decode_attention(q, k_cache, v_cache, lens), q, k_cache, v_cache, lens, TOL[torch.float16])
    k_new, v_new = (t.view(batch, heads_kv, head_dim) for t in fused[:, heads_q * head_dim :].chunk(2, dim=-1))
    before = v_cache.clone()
    cache_append(k_cache, v_cache, k_new, v_new, lens)  # row 0 at 20: past the cache, nothing written
    assert torch.equal(k_cache[1, :, 11], k_new[1]) and torch.equal(v_cache[0], before[0])


def test_custom_ops_and_fakes():
    q, k_cache, v_cache, _ = make_inputs(2, 4, 2, 32, 20, [20, 3], torch.float32)
    k_new, v_new = torch.randn(2, 2, 2, 32).unbind(0)
    positions = torch.tensor([19, 2], dtype=torch.int32)
    out = torch.ops.kernl.decode_attention_append(q, k_cache, v_cache, k_new, v_new, positions, 0.2)
    assert torch.equal(k_cache[0, :, 19], k_new[0]) and torch.equal(v_cache[1, :, 2], v_new[1])
    check(out, q, k_cache, v_cache, positions + 1, TOL[torch.float32], scale=0.2)
    # opcheck runs each op several times: one row, one head, one tile.
    q, k_cache, v_cache, lens = make_inputs(1, 1, 1, 16, 16, [16], torch.float32)
    k_cache, v_cache = k_cache.nan_to_num(), v_cache.nan_to_num()
    k_new, v_new, positions = torch.randn(1, 1, 16), torch.randn(1, 1, 16), torch.tensor([9], dtype=torch.int32)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.kernl.decode_attention.default, (q, k_cache, v_cache, lens, None), test_utils=tests)
    torch.library.opcheck(
        torch.ops.kernl.cache_append.default, (k_cache, v_cache, k_new, v_new, positions), test_utils=tests
    )
    torch.library.opcheck(
        torch.ops.kernl.decode_attention_append.default,
        (q, k_cache, v_cache, k_new, v_new, positions, 0.5),
        test_utils=tests,
    )


def test_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k_cache, v_cache, lens = make_inputs(2, 4, 2, 32, 20, [20, 3], torch.float32)
    assert torch.equal(
        decode_attention(q, k_cache, v_cache, lens), decode_attention_reference(q, k_cache, v_cache, lens)
    )
    k_new, v_new = torch.randn(2, 2, 2, 32).unbind(0)
    out = decode_attention_append(q, k_cache, v_cache, k_new, v_new, lens)  # positions 20 (past) and 3
    assert torch.equal(k_cache[1, :, 3], k_new[1])
    check(out, q, k_cache, v_cache, torch.tensor([20, 4]), TOL[torch.float32])


def _args(**over):
    args = dict(
        q=torch.randn(2, 4, 32),
        k_cache=torch.randn(3, 2, 10, 32),
        v_cache=torch.randn(3, 2, 10, 32),
        lengths=torch.tensor([3, 10], dtype=torch.int32),
    )
    args.update(over)
    return args


@pytest.mark.parametrize(
    "args, name",
    [
        (_args(q=torch.randn(2, 4, 1, 32)), "q"),
        (_args(q=torch.randn(2, 4, 300)), "q"),
        (_args(q=torch.randint(0, 3, (2, 4, 32))), "q"),
        (_args(k_cache=torch.randn(3, 2, 10, 16)), "k_cache"),
        (_args(k_cache=torch.randn(1, 2, 10, 32)), "k_cache"),
        (_args(k_cache=torch.randn(3, 3, 10, 32), v_cache=torch.randn(3, 3, 10, 32)), "k_cache"),
        (_args(k_cache=torch.randn(3, 2, 10, 32).half()), "k_cache"),
        (_args(k_cache=torch.randn(3, 2, 10, 32, device="meta")), "k_cache"),
        (_args(v_cache=torch.randn(3, 2, 9, 32)), "v_cache"),
        (_args(lengths=torch.tensor([3.0, 10.0])), "lengths"),
        (_args(lengths=torch.tensor([3, 10, 4], dtype=torch.int32)), "lengths"),
        (_args(lengths=torch.tensor([3, 10], dtype=torch.int32, device="meta")), "lengths"),
    ],
)
def test_bad_input_names_the_argument(args, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        decode_attention(args["q"], args["k_cache"], args["v_cache"], args["lengths"])


@pytest.mark.parametrize(
    "k_new, v_new, positions, name",
    [
        (torch.randn(2, 3, 32), torch.randn(2, 2, 32), torch.tensor([1, 2]), "k_new"),
        (torch.randn(2, 2, 32), torch.randn(2, 2, 16), torch.tensor([1, 2]), "v_new"),
        (torch.randn(2, 2, 32), torch.randn(2, 2, 32).half(), torch.tensor([1, 2]), "v_new"),
        (torch.randn(2, 2, 32), torch.randn(2, 2, 32), torch.tensor([1]), "positions"),
        (torch.randn(4, 2, 32), torch.randn(4, 2, 32), torch.tensor([1, 2, 3, 4]), "k_cache"),
    ],
)
def test_bad_append_input_names_the_argument(k_new, v_new, positions, name):
    a = _args()
    with pytest.raises(ValueError, match=f"^{name}:"):
        cache_append(a["k_cache"], a["v_cache"], k_new, v_new, positions)
    if k_new.shape[0] == a["q"].shape[0] and name != "positions":
        with pytest.raises(ValueError, match=f"^{name}:"):
            decode_attention_append(a["q"], a["k_cache"], a["v_cache"], k_new, v_new, positions)


# --- GPU: realistic shapes; kernl's error must stay within twice torch SDPA's, both against fp32. ---


def sdpa_over_cache(q, k_cache, v_cache, lengths):
    """What a static-cache model runs: SDPA over the whole cache with a padding mask, in the input dtype."""
    batch, heads_q, _ = q.shape
    heads_kv, max_len = k_cache.shape[1], k_cache.shape[2]
    k = k_cache[:batch].repeat_interleave(heads_q // heads_kv, dim=1)
    v = v_cache[:batch].repeat_interleave(heads_q // heads_kv, dim=1)
    keep = torch.arange(max_len, device=q.device)[None, :] < lengths[:, None]
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=keep[:, None, None, :])[:, :, 0]


GPU_CASES = [
    # (batch, heads_q, heads_kv, head_dim, max_len)
    (1, 32, 8, 64, 2048),  # llama-class 1.2B
    (8, 32, 8, 64, 2048),
    (32, 32, 8, 64, 2048),
    (1, 32, 8, 128, 4096),  # Llama-8B
    (4, 12, 12, 64, 1024),  # GPT-2
    (2, 32, 4, 80, 1000),
    (2, 16, 2, 256, 777),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, heads_q, heads_kv, head_dim, max_len", GPU_CASES)
def test_error_within_twice_sdpa(poisoned_empty, dtype, batch, heads_q, heads_kv, head_dim, max_len):
    q = torch.randn(batch, heads_q, head_dim, dtype=dtype, device="cuda")
    k_cache, v_cache = torch.randn(2, batch, heads_kv, max_len, head_dim, dtype=dtype, device="cuda").unbind(0)
    lengths = torch.randint(1, max_len + 1, (batch,), dtype=torch.int32, device="cuda")
    lengths[0] = max_len
    ref = decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), lengths)
    torch_err = rel_err(sdpa_over_cache(q, k_cache, v_cache, lengths), ref)
    poison(k_cache, v_cache, lengths)  # after SDPA, which reads every position
    out = decode_attention(q, k_cache, v_cache, lengths)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    kernl_err = rel_err(out, ref)
    assert kernl_err <= 2 * torch_err + 1e-6, (kernl_err, torch_err)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_fp32_on_gpu(poisoned_empty, head_dim):
    q, k_cache, v_cache, lens = make_inputs(3, 16, 4, head_dim, 600, [600, 1, 333], torch.float32, device="cuda")
    check(decode_attention(q, k_cache, v_cache, lens), q, k_cache, v_cache, lens, TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 8])
def test_one_graph_serves_every_length(dtype, batch):
    """Captured once, replayed with new lengths and queries written into the same tensors."""
    heads_q, heads_kv, head_dim, max_len = 32, 8, 128, 2048
    q = torch.randn(batch, heads_q, head_dim, dtype=dtype, device="cuda")
    k_cache, v_cache = torch.randn(2, batch, heads_kv, max_len, head_dim, dtype=dtype, device="cuda").unbind(0)
    lengths = torch.full((batch,), max_len, dtype=torch.int32, device="cuda")
    decode_attention(q, k_cache, v_cache, lengths)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k_cache, v_cache, lengths)
    for trial in [[1], [7], [37], [1023], [max_len], None]:
        new = torch.randint(1, max_len + 1, (batch,)) if trial is None else torch.tensor(trial * batch)
        lengths.copy_(new)
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        ref = decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), lengths)
        assert rel_err(out, ref) < TOL[dtype], (trial, rel_err(out, ref))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_graph_decode_loop_with_fused_append(dtype):
    """A decode loop as the runtime will run it: one captured step replayed, positions advanced on the device,
    rows at different positions; each step matches attention over the whole sequence so far."""
    batch, heads_q, heads_kv, head_dim, max_len, steps = 4, 32, 8, 64, 512, 20
    keys = torch.randn(batch, heads_kv, max_len, head_dim, dtype=dtype, device="cuda")
    values = torch.randn(batch, heads_kv, max_len, head_dim, dtype=dtype, device="cuda")
    starts = torch.tensor([0, 1, 100, 490], device="cuda")
    k_cache, v_cache = keys.clone(), values.clone()
    poison(k_cache, v_cache, starts)
    positions = starts.to(torch.int32)
    q = torch.randn(batch, heads_q, head_dim, dtype=dtype, device="cuda")
    k_new = torch.empty(batch, heads_kv, head_dim, dtype=dtype, device="cuda")
    v_new = torch.empty_like(k_new)
    scratch_k, scratch_v = k_cache.clone(), v_cache.clone()
    decode_attention_append(q, scratch_k, scratch_v, k_new, v_new, positions)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_append(q, k_cache, v_cache, k_new, v_new, positions)
        positions.add_(1)
    rows = torch.arange(batch, device="cuda")
    for _ in range(steps):
        current = positions.long().clone()
        k_new.copy_(keys[rows, :, current])
        v_new.copy_(values[rows, :, current])
        q.copy_(torch.randn_like(q))
        graph.replay()
        ref = decode_attention_reference(q.float(), keys.float(), values.float(), current + 1)
        assert rel_err(out, ref) < TOL[dtype]
    assert torch.equal(positions.cpu(), (starts + steps).int().cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_append_then_attend_equals_fused_on_gpu(dtype):
    """cache_append + decode_attention and the fused kernel leave the same cache and agree on the output."""
    batch, heads_q, heads_kv, head_dim, max_len = 8, 32, 8, 128, 1024
    q = torch.randn(batch, heads_q, head_dim, dtype=dtype, device="cuda")
    k_cache, v_cache = torch.randn(2, batch + 2, heads_kv, max_len, head_dim, dtype=dtype, device="cuda").unbind(0)
    k_new, v_new = torch.randn(2, batch, heads_kv, head_dim, dtype=dtype, device="cuda").unbind(0)
    positions = torch.randint(0, max_len, (batch,), dtype=torch.int32, device="cuda")
    positions[0], positions[1] = 0, max_len - 1
    k2, v2 = k_cache.clone(), v_cache.clone()
    cache_append(k_cache, v_cache, k_new, v_new, positions)
    separate = decode_attention(q, k_cache, v_cache, positions + 1)
    fused = decode_attention_append(q, k2, v2, k_new, v_new, positions)
    assert torch.equal(k_cache, k2) and torch.equal(v_cache, v2)
    ref = decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), positions + 1)
    assert rel_err(fused, ref) < TOL[dtype] and rel_err(separate, ref) < TOL[dtype]
