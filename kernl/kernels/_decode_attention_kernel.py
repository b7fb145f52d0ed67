"""Triton kernels behind decode attention: split-K ("flash-decoding") over a static KV cache, and cache appends.

One query token per row. A row's valid length is read from a device tensor inside the kernels, so one launch
(and one captured CUDA graph) serves every length: the grid is fixed by the cache's size, and the programs
whose share of the row lies past its length return before they load anything.

Phase 1, grid (batch * heads_kv, splits): each program takes one kv head of one row, all the query heads of
its GQA group at once (they share every K/V load), and one contiguous slice of the row's positions. The
slice is the row's length divided by the split count, so the work stays spread over all splits whatever the
length. It writes its slice's normalised output and log-sum-exp (fp32) to a workspace; phase 2, one program
per (row, query head), weighs the slices by their log-sum-exp. With one split, phase 1 writes the output.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernl.kernels._pdl import pdl_options, wait_for_inputs

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * log2(e)); exp2 is the fast hardware path
# Start of the running max: finite, so a slice that has seen no key yet rescales by exp2(-huge) == 0, not NaN.
MAX_FLOOR = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def decode_attention_kernel(
    Q,  # [batch, heads_q, head_dim] one query token per row, any strides
    K,  # K cache [rows >= batch, heads_kv, max_len, head_dim], any strides
    V,  # V cache, like K
    Lens,  # [batch] int32/int64 on the device: lengths, or positions of the new token (APPEND)
    KNew,  # [batch, heads_kv, head_dim] the new token's keys (APPEND only; any valid pointer otherwise)
    VNew,  # like KNew
    Out,  # [batch, heads_q, head_dim], written here when NUM_SPLITS == 1
    PartO,  # [batch, heads_q, NUM_SPLITS, HEAD_DIM] fp32 contiguous: each split's normalised output
    PartLse,  # [batch, heads_q, NUM_SPLITS] fp32 contiguous: each split's log2-sum-exp2 of scores
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_knb,
    stride_knh,
    stride_knd,
    stride_vnb,
    stride_vnh,
    stride_vnd,
    stride_ob,
    stride_oh,
    stride_od,
    heads_kv,
    group,  # heads_q // heads_kv: q heads off_hk * group .. + group - 1 read kv head off_hk
    max_len,  # positions the cache holds
    score_scale,  # softmax scale times log2(e)
    HEAD_DIM: tl.constexpr,
    PAD_D: tl.constexpr,  # BLOCK_D > HEAD_DIM (80, 96...): mask the padded head dims
    APPEND: tl.constexpr,  # write KNew/VNew at positions[b], then attend over [0, positions[b]]
    NUM_SPLITS: tl.constexpr,  # power of two; 1: no workspace, write Out directly
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs: exact products, no silent TF32
    BLOCK_H: tl.constexpr,  # the group's q heads padded to tl.dot's minimum of 16 rows
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # a no-op without PDL; the guard saves the interpreter a device-function call a program
        wait_for_inputs(USE_PDL)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    off_b = pid // heads_kv
    off_hk = pid % heads_kv
    heads_q = heads_kv * group

    # Valid positions of this row: lengths[b], or positions[b] + 1 with APPEND (the new token included).
    # Clamped to [0, max_len]: a wrong value on the device never reads outside the cache.
    # (The kernels inline their helpers: each device-function call costs milliseconds in the interpreter.)
    pos = tl.load(Lens + off_b)
    if APPEND:
        length = tl.minimum(tl.maximum(pos + 1, 0), max_len).to(tl.int32)
    else:
        length = tl.minimum(tl.maximum(pos, 0), max_len).to(tl.int32)
    # Positions per split: the row's length shared out, rounded up to whole tiles (at least one tile, so a
    # zero length divides by nothing). Phase 2 recomputes it the same way.
    chunk = tl.maximum(((length + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N, 1) * BLOCK_N
    start = split * chunk
    if NUM_SPLITS > 1:
        # Nothing of this row falls in this split: no load, no store (phase 2 reads only active splits).
        if start >= length:
            return
    end = tl.minimum(start + chunk, length)

    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_h = offs_h < group
    in_d = offs_d < HEAD_DIM
    b64 = off_b.to(tl.int64)
    hk64 = off_hk.to(tl.int64)
    heads = off_hk * group + offs_h  # q heads of this group (rows past `group` are padding)

    # The group's query heads, read once; padding rows are zeros and are never stored.
    q_ptrs = Q + b64 * stride_qb + heads[:, None].to(tl.int64) * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=in_h[:, None] & in_d[None, :], other=0.0)
    k_base = K + b64 * stride_kb + hk64 * stride_kh
    v_base = V + b64 * stride_vb + hk64 * stride_vh

    # With APPEND, the new token sits at length - 1 unless positions[b] fell outside the cache: its key and
    # value come from KNew/VNew (registers), not from the cache, so the cache write below races with nothing.
    cache_end = end
    new_token = False
    if APPEND:
        new_token = (pos >= 0) & (pos < max_len) & (end == length)
        if new_token:
            cache_end = end - 1

    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], MAX_FLOOR, dtype=tl.float32)
    for start_n in range(start, cache_end, BLOCK_N):
        in_n = start_n + offs_n < cache_end
        n64 = tl.cast(start_n, tl.int64)  # position times stride passes 2**31 in large caches
        # K read transposed ([BLOCK_D, BLOCK_N]) so that q @ kt needs no in-register transpose. The mask
        # varies along positions only, so loads along head_dim keep their full vector width. Positions past
        # the end are never loaded (other=0.0): whatever the cache holds there, NaN included, cannot reach
        # the output.
        kt_ptrs = k_base + n64 * stride_kn + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
        v_ptrs = v_base + n64 * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if PAD_D:
            kt = tl.load(kt_ptrs, mask=in_d[:, None] & in_n[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=in_n[:, None] & in_d[None, :], other=0.0)
        else:
            kt = tl.load(kt_ptrs, mask=in_n[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=in_n[:, None], other=0.0)
        qk = tl.dot(q, kt, input_precision=INPUT_PRECISION)
        s = tl.where(in_n[None, :], qk * score_scale, float("-inf"))
        # Online softmax: rescale what was summed so far to the new max.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        # P in the cache dtype for the tensor cores, as flash-attention does; the sum stays fp32.
        acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new

    if APPEND:
        if new_token:
            # Only this program (last split of the row, this kv head) touches position pos: write it to the
            # cache for later steps, and fold it into the softmax as one more key.
            kn = tl.load(KNew + b64 * stride_knb + hk64 * stride_knh + offs_d * stride_knd, mask=in_d, other=0.0)
            vn = tl.load(VNew + b64 * stride_vnb + hk64 * stride_vnh + offs_d * stride_vnd, mask=in_d, other=0.0)
            p64 = pos.to(tl.int64)
            tl.store(k_base + p64 * stride_kn + offs_d * stride_kd, kn.to(K.dtype.element_ty), mask=in_d)
            tl.store(v_base + p64 * stride_vn + offs_d * stride_vd, vn.to(V.dtype.element_ty), mask=in_d)
            # The cache dtype is the compute dtype: round as the cache will hold it.
            kf = kn.to(K.dtype.element_ty).to(tl.float32)
            vf = vn.to(V.dtype.element_ty).to(tl.float32)
            s_new = tl.sum(q.to(tl.float32) * kf[None, :], 1) * score_scale
            m_new = tl.maximum(m_i, s_new)
            p_new = tl.exp2(s_new - m_new)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + p_new
            acc = acc * alpha[:, None] + p_new[:, None] * vf[None, :]
            m_i = m_new

    h64 = heads.to(tl.int64)
    if NUM_SPLITS == 1:
        # A row of length 0 has acc == 0 and l == 0: divide by 1 so it comes out 0, not NaN.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = Out + b64 * stride_ob + h64[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=in_h[:, None] & in_d[None, :])
    else:
        # An active split holds at least one position, so l > 0.
        out = acc / l_i[:, None]
        lse = m_i + tl.log2(l_i)
        part = (b64 * heads_q + h64) * NUM_SPLITS + split  # [BLOCK_H] index of (row, head, split)
        tl.store(PartO + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=in_h[:, None] & in_d[None, :])
        tl.store(PartLse + part, lse, mask=in_h)


@triton.jit
def decode_combine_kernel(
    Lens,  # as in phase 1: the active split count is recomputed from it, never stored
    PartO,  # [batch, heads_q, NUM_SPLITS, HEAD_DIM] fp32 from phase 1
    PartLse,  # [batch, heads_q, NUM_SPLITS] fp32 from phase 1
    Out,  # [batch, heads_q, head_dim]
    stride_ob,
    stride_oh,
    stride_od,
    heads_q,
    max_len,
    HEAD_DIM: tl.constexpr,
    FROM_POSITIONS: tl.constexpr,  # Lens holds positions (APPEND in phase 1)
    NUM_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # phase 1's tile: the split chunk is a multiple of it
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        wait_for_inputs(USE_PDL)
    pid = tl.program_id(0)  # off_b * heads_q + off_h
    off_b = pid // heads_q
    off_h = pid % heads_q
    # The row's length and split chunk exactly as phase 1 computed them.
    n = tl.load(Lens + off_b)
    if FROM_POSITIONS:
        n = n + 1
    length = tl.minimum(tl.maximum(n, 0), max_len).to(tl.int32)
    chunk = tl.maximum(((length + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N, 1) * BLOCK_N
    n_active = (length + chunk - 1) // chunk

    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    live = offs_s < n_active
    in_d = offs_d < HEAD_DIM
    # Inactive splits were never written: masked out, so the workspace's old contents do not matter.
    part = pid.to(tl.int64) * NUM_SPLITS + offs_s
    lse = tl.load(PartLse + part, mask=live, other=float("-inf"))
    o = tl.load(PartO + part[:, None] * HEAD_DIM + offs_d[None, :], mask=live[:, None] & in_d[None, :], other=0.0)
    # out = sum_s exp(lse_s) o_s / sum_s exp(lse_s), scaled by the largest lse to stay in range.
    m = tl.maximum(tl.max(lse, 0), MAX_FLOOR)  # finite: a row of length 0 gives exp2(-inf) == 0, no NaN
    w = tl.exp2(lse - m)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total == 0.0, 1.0, total)  # length 0: zeros
    o_ptrs = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh + offs_d * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=in_d)


@triton.jit
def cache_append_kernel(
    K,  # K cache [rows >= batch, heads_kv, max_len, head_dim], any strides
    V,  # V cache, like K
    KNew,  # [batch, heads_kv, head_dim], any strides
    VNew,  # like KNew
    Pos,  # [batch] int32/int64 on the device: where row b's token goes
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_knb,
    stride_knh,
    stride_knd,
    stride_vnb,
    stride_vnh,
    stride_vnd,
    heads_kv,
    max_len,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        wait_for_inputs(USE_PDL)
    pid = tl.program_id(0)  # off_b * heads_kv + off_hk
    b64 = (pid // heads_kv).to(tl.int64)
    hk64 = (pid % heads_kv).to(tl.int64)
    pos = tl.load(Pos + b64).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < HEAD_DIM
    # A position outside the cache writes nothing: never an out-of-bounds store.
    if (pos >= 0) & (pos < max_len):
        kn = tl.load(KNew + b64 * stride_knb + hk64 * stride_knh + offs_d * stride_knd, mask=in_d)
        vn = tl.load(VNew + b64 * stride_vnb + hk64 * stride_vnh + offs_d * stride_vnd, mask=in_d)
        k_ptrs = K + b64 * stride_kb + hk64 * stride_kh + pos * stride_kn + offs_d * stride_kd
        v_ptrs = V + b64 * stride_vb + hk64 * stride_vh + pos * stride_vn + offs_d * stride_vd
        tl.store(k_ptrs, kn.to(K.dtype.element_ty), mask=in_d)
        tl.store(v_ptrs, vn.to(V.dtype.element_ty), mask=in_d)


class DecodeConfig(NamedTuple):
    block_n: int  # positions per tile
    num_splits: int  # power of two, at most MAX_SPLITS
    num_warps: int
    num_stages: int


MAX_SPLITS = 64
# The interpreter's stand-in for the SM count: small, so that test shapes still split several ways.
_INTERPRETER_SMS = 16


@functools.lru_cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_splits(rows_heads: int, max_len: int, block_n: int, sms: int) -> int:
    """Splits per (row, kv head): the fewest (a power of two) that give at least 3/4 of a program per SM.

    At most one split per tile of the full cache and at most MAX_SPLITS. Each split costs a partial output
    of group x head_dim fp32 written and read back, so more than about one wave buys nothing. H100, 132 SMs:
    batch 1 x 8 kv heads -> 16 splits (128 programs); batch 8 -> 2; batch 32 -> 1 (no combine kernel).
    """
    most = min(MAX_SPLITS, max(1, triton.cdiv(max_len, block_n)))
    splits = 1
    while 4 * rows_heads * splits < 3 * sms and 2 * splits <= most:
        splits *= 2
    return splits


def decode_config(
    batch: int, heads_q: int, heads_kv: int, max_len: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> DecodeConfig:
    """Tile and split count. The cache is read once: tiles are sized for bytes in flight, not for FLOPs.

    fp16/bf16: a K or V tile is 16 KB at every head_dim (128 positions at d 64, 64 at d 128, 32 at d 256);
    three stages double-buffer K and V in 72 KB of shared memory, ~135 registers a thread at 4 warps (d 256,
    or more than 32 q heads a kv head: 8 warps, else ~250 registers): three programs an SM. Compiled for
    sm_90, no config spills.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":
        # The interpreter: small tiles, so short test lengths still cross tile and split edges; 64 for long
        # caches, since every tile costs tens of milliseconds there.
        block_n = 16 if max_len < 256 else 64
        return DecodeConfig(block_n, decode_splits(batch * heads_kv, max_len, block_n, _INTERPRETER_SMS), 4, 1)
    if dtype == torch.float32:
        # fp32 dots run on FMA units ("ieee") with both operands in registers: 32 positions spill at d 128.
        block_n, warps, stages = (32 if block_d <= 64 else 16), 4, 2
    else:
        wide = block_d > 128 or heads_q // heads_kv > 32
        block_n, warps, stages = max(16, min(128, 8192 // block_d)), (8 if wide else 4), 3
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return DecodeConfig(block_n, decode_splits(batch * heads_kv, max_len, block_n, sms), warps, stages)


def launch_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lens: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    scale: float,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Run phase 1 (and phase 2 when split) on checked inputs. With k_new/v_new, lens holds positions."""
    batch, heads_q, head_dim = q.shape
    heads_kv, max_len = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty((batch, heads_q, head_dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    cfg = config or decode_config(batch, heads_q, heads_kv, max_len, head_dim, q.dtype, q.device)
    append = k_new is not None
    group = heads_q // heads_kv
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs >= 16; 80 and 96 pad to 128
    splits = cfg.num_splits
    if splits > 1:
        part_o = torch.empty((batch, heads_q, splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, heads_q, splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # never read or written
    if append:
        kn, vn = k_new, v_new
    else:
        kn = vn = q  # never read
    pdl = pdl_options(q)
    decode_attention_kernel[(batch * heads_kv, splits)](
        q, k_cache, v_cache, lens, kn, vn, out, part_o, part_lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *kn.stride(), *vn.stride(), *out.stride(),
        heads_kv, group, max_len, scale * LOG2E,
        HEAD_DIM=head_dim,
        PAD_D=block_d != head_dim,
        APPEND=append,
        NUM_SPLITS=splits,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=cfg.block_n,
        BLOCK_D=block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl,
    )  # fmt: skip
    if splits > 1:
        decode_combine_kernel[(batch * heads_q,)](
            lens, part_o, part_lse, out, *out.stride(), heads_q, max_len,
            HEAD_DIM=head_dim,
            FROM_POSITIONS=append,
            NUM_SPLITS=splits,
            BLOCK_N=cfg.block_n,
            BLOCK_D=block_d,
            num_warps=1 if splits * block_d <= 2048 else 4,
            **pdl,
        )  # fmt: skip
    return out


def launch_cache_append(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor
) -> None:
    """Write k_new[b], v_new[b] at positions[b] of cache rows b < batch, every kv head; one launch."""
    batch, heads_kv, head_dim = k_new.shape
    if batch * heads_kv == 0:
        return
    cache_append_kernel[(batch * heads_kv,)](
        k_cache, v_cache, k_new, v_new, positions,
        *k_cache.stride(), *v_cache.stride(), *k_new.stride(), *v_new.stride(),
        heads_kv, k_cache.shape[2],
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=1,
        **pdl_options(k_cache),
    )  # fmt: skip
