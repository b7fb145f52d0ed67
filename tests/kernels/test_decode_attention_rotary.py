"""decode_attention_append_rotary (rotary of q and k_new folded into the decode attention kernel) against the
unfolded step in plain torch (rotary_reference, then the append and decode attention references) and an fp64
formula: GQA, partial rotary, one cos row for the batch or one a row, strided q/k_new, idle rows and positions
past the cache."""

import pytest
import torch

from kernl.kernels.decode_attention import cache_append_reference, decode_attention_reference
from kernl.kernels.decode_attention_rotary import (
    decode_attention_append_rotary,
    decode_attention_append_rotary_reference,
)
from kernl.kernels.rotary import rotary_reference
from tests.kernels.helpers import rel_err
from tests.kernels.test_decode_attention import TOL, check, poison

# The rotated key the cache holds: the same fp32 products as rotary_reference, rounded once; an FMA on a GPU
# may move that rounding by one step.
CACHE_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3)}


def rotation_rows(rows: int, rot: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of an independent angle per output dim (not HF's cat(freqs, freqs)): a kernel that read one
    half for both would be caught."""
    angle = torch.rand(rows, rot) * 6.3
    return angle.cos().to(dtype), angle.sin().to(dtype)


def unfolded(q, k_cache, v_cache, k_new, v_new, positions, cos, sin, scale):
    """The decode step as the graph ran it before the fold: rotary, then the append, then attention."""
    q_rot, k_rot = rotary_reference(q[:, :, None], k_new[:, :, None], cos[:, None], sin[:, None])
    cache_append_reference(k_cache, v_cache, k_rot[:, :, 0], v_new, positions)
    lengths = (positions.long() + 1).clamp(0, k_cache.shape[2])
    return q_rot[:, :, 0], decode_attention_reference(q_rot[:, :, 0], k_cache, v_cache, lengths, scale), lengths


# (dtype, batch, heads_q, heads_kv, head_dim, rot, max_len, positions, cos_rows)
CASES = [
    (torch.float16, 2, 8, 2, 64, 64, 96, [95, 30], 2),  # GQA 4, full rotary, one cos row a row
    (torch.float16, 3, 4, 1, 64, 32, 40, [0, 17, 39], 1),  # partial rotary, one cos row for the batch
    (torch.float32, 2, 6, 2, 80, 16, 50, [49, 8], 2),  # head_dim 80 (padded to 128), rot 16: most dims pass
    (torch.float32, 3, 2, 2, 32, 32, 24, [-1, 24, 5], 3),  # an idle row, a position past the cache
]


@pytest.mark.parametrize("dtype, batch, heads_q, heads_kv, head_dim, rot, max_len, positions, cos_rows", CASES)
def test_matches_the_unfolded_step(poisoned_empty, dtype, batch, heads_q, heads_kv, head_dim, rot, max_len, positions,
                                   cos_rows):  # fmt: skip
    q = torch.randn(batch, heads_q, head_dim, dtype=dtype)
    k_cache, v_cache = torch.randn(2, batch, heads_kv, max_len, head_dim, dtype=dtype).unbind(0)
    k_new, v_new = torch.randn(2, batch, heads_kv, head_dim, dtype=dtype).unbind(0)
    positions = torch.tensor(positions, dtype=torch.int32)
    poison(k_cache, v_cache, positions.long().clamp(min=0))  # the cache holds [0, position)
    cos, sin = rotation_rows(cos_rows, rot, torch.float32 if cos_rows == 1 else dtype)
    scale = head_dim**-0.5
    want_k, want_v = k_cache.clone(), v_cache.clone()
    cos_b, sin_b = cos.expand(batch, rot), sin.expand(batch, rot)
    q_rot, want, lengths = unfolded(q, want_k, want_v, k_new, v_new, positions, cos_b, sin_b, scale)

    out = decode_attention_append_rotary(q, k_cache, v_cache, k_new, v_new, positions, cos, sin, scale=scale)
    torch.testing.assert_close(k_cache, want_k, equal_nan=True, **CACHE_TOL[dtype])
    assert torch.equal(v_cache.nan_to_num(7.0), want_v.nan_to_num(7.0))  # v is copied as it is
    check(out, q_rot, want_k, want_v, lengths, TOL[dtype], scale=scale)  # the fp64 formula on the rotated q
    assert rel_err(out, want) < TOL[dtype]
    if rot < head_dim:  # partial rotary: the tail dims of the appended key are k_new's, bit for bit
        for b, pos in enumerate(positions.tolist()):
            if 0 <= pos < max_len:
                assert torch.equal(k_cache[b, :, pos, rot:], k_new[b, :, rot:])


def test_strided_q_and_k_new_from_a_fused_projection(poisoned_empty):
    """q, k_new and v_new as the decode graph hands them over: head views of one [b, 1, (hq + 2 hkv) d] output."""
    batch, heads_q, heads_kv, head_dim, max_len = 2, 4, 2, 32, 20
    fused = torch.randn(batch, 1, (heads_q + 2 * heads_kv) * head_dim, dtype=torch.float16)
    q, k_new, v_new = (
        t.view(batch, 1, -1, head_dim).transpose(1, 2).squeeze(2)
        for t in fused.split([heads_q * head_dim, heads_kv * head_dim, heads_kv * head_dim], dim=-1)
    )
    assert not q.is_contiguous() and not k_new.is_contiguous()
    k_cache, v_cache = torch.randn(2, batch + 1, heads_kv, max_len, head_dim, dtype=torch.float16).unbind(0)
    positions = torch.tensor([19, 4], dtype=torch.int64)
    poison(k_cache, v_cache, positions)
    cos, sin = rotation_rows(batch, head_dim, torch.float32)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    _, want, _ = unfolded(q, want_k, want_v, k_new, v_new, positions, cos, sin, 0.3)
    out = decode_attention_append_rotary(q, k_cache, v_cache, k_new, v_new, positions, cos, sin, scale=0.3)
    assert rel_err(out, want) < TOL[torch.float16]
    torch.testing.assert_close(k_cache, want_k, equal_nan=True, **CACHE_TOL[torch.float16])


def test_reference_is_the_unfolded_step():
    """What runs without Triton (and in the generation tests on CPU) is the unfolded step."""
    batch, heads_q, heads_kv, head_dim, max_len = 3, 4, 2, 16, 12
    q = torch.randn(batch, heads_q, head_dim)
    k_cache, v_cache = torch.randn(2, batch, heads_kv, max_len, head_dim).unbind(0)
    k_new, v_new = torch.randn(2, batch, heads_kv, head_dim).unbind(0)
    positions = torch.tensor([3, 11, -1])
    cos, sin = rotation_rows(1, 8, torch.float32)
    k2, v2 = k_cache.clone(), v_cache.clone()
    got = decode_attention_append_rotary_reference(q, k_cache, v_cache, k_new, v_new, positions, cos, sin, 0.25)
    _, want, _ = unfolded(q, k2, v2, k_new, v_new, positions, cos.expand(3, 8), sin.expand(3, 8), 0.25)
    assert torch.equal(got, want) and torch.equal(k_cache, k2) and torch.equal(v_cache, v2)


def test_custom_op_and_fake():
    q = torch.randn(1, 2, 16)
    k_cache, v_cache = torch.randn(2, 1, 1, 16, 16).unbind(0)
    k_new, v_new = torch.randn(2, 1, 1, 16).unbind(0)
    positions = torch.tensor([9], dtype=torch.int32)
    cos, sin = rotation_rows(1, 8, torch.float32)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    _, want, _ = unfolded(q, want_k, want_v, k_new, v_new, positions, cos, sin, 0.5)
    out = torch.ops.kernl.decode_attention_append_rotary(q, k_cache, v_cache, k_new, v_new, positions, cos, sin, 0.5)
    assert rel_err(out, want) < TOL[torch.float32]
    torch.testing.assert_close(k_cache, want_k, **CACHE_TOL[torch.float32])
    torch.library.opcheck(
        torch.ops.kernl.decode_attention_append_rotary.default,
        (q, k_cache, v_cache, k_new, v_new, positions, cos, sin, 0.5),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize(
    "cos, sin, name",
    [
        (torch.randn(2, 8, 1), torch.randn(2, 8, 1), "cos"),  # rank 3
        (torch.randn(3, 8), torch.randn(3, 8), "cos"),  # 3 rows for a batch of 2
        (torch.randn(2, 7), torch.randn(2, 7), "cos"),  # odd rot_dim
        (torch.randn(2, 64), torch.randn(2, 64), "cos"),  # rot_dim past head_dim
        (torch.randn(2, 8, device="meta"), torch.randn(2, 8, device="meta"), "cos"),
        (torch.randn(2, 8), torch.randn(1, 8), "sin"),
        (torch.randn(2, 8), torch.randn(2, 8).half(), "sin"),
    ],
)
def test_bad_rotation_names_the_argument(cos, sin, name):
    q = torch.randn(2, 4, 32)
    k_cache, v_cache = torch.randn(2, 2, 2, 10, 32).unbind(0)
    k_new, v_new = torch.randn(2, 2, 2, 32).unbind(0)
    with pytest.raises(ValueError, match=f"^{name}:"):
        decode_attention_append_rotary(q, k_cache, v_cache, k_new, v_new, torch.tensor([1, 2]), cos, sin)


# --- GPU: the fold against the two kernels it replaces, inside one captured graph replayed at new positions. ---


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rot", [128, 64])
def test_gpu_fold_equals_rotary_then_append(dtype, rot):
    from kernl.kernels.decode_attention import decode_attention_append
    from kernl.kernels.rotary import rotary

    batch, heads_q, heads_kv, head_dim, max_len = 2, 32, 8, 128, 1024
    q = torch.randn(batch, heads_q, head_dim, dtype=dtype, device="cuda")
    k_new, v_new = torch.randn(2, batch, heads_kv, head_dim, dtype=dtype, device="cuda").unbind(0)
    k_cache, v_cache = torch.randn(2, batch, heads_kv, max_len, head_dim, dtype=dtype, device="cuda").unbind(0)
    positions = torch.zeros(batch, dtype=torch.int32, device="cuda")
    cos, sin = (t.cuda() for t in rotation_rows(batch, rot, torch.float32))
    k2, v2 = k_cache.clone(), v_cache.clone()
    decode_attention_append_rotary(q, k2, v2, k_new, v_new, positions, cos, sin)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        folded = decode_attention_append_rotary(q, k2, v2, k_new, v_new, positions, cos, sin)
    for trial in ([0, 1], [511, 7], [1023, 300]):
        positions.copy_(torch.tensor(trial))
        for t in (q, k_new, v_new):
            t.copy_(torch.randn_like(t))
        graph.replay()
        q_rot, k_rot = rotary(q[:, :, None], k_new[:, :, None], cos[:, None], sin[:, None])
        want = decode_attention_append(q_rot[:, :, 0], k_cache, v_cache, k_rot[:, :, 0], v_new, positions)
        torch.cuda.synchronize()
        assert rel_err(folded, want) < TOL[dtype], trial
        torch.testing.assert_close(k2, k_cache, rtol=1e-2, atol=1e-2)
        assert torch.equal(v2, v_cache)
