"""Flash-attention-2 style forward kernel: online softmax over key tiles, GQA, masks, causal, strided inputs."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernl.kernels._pdl import pdl_options, wait_for_inputs

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) == exp2(x * log2(e)); exp2 is the fast hardware path
# Floor of the running row max: finite, so a row whose keys are all masked (-inf) gives exp2(-inf) == 0, not NaN.
# It is the lowest fp32, so a finite mask value as low as finfo(float32).min still counts as a visible key.
MAX_FLOOR = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _load_2d(ptrs, rows_ok, cols_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    # Mask only the dims that can run past the tensor: an unmasked load keeps full vector width.
    # (Nested ifs, not `and`: boolean operators on constexprs changed across Triton versions.)
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # fp32 inputs: full fp32 products (tl.dot would round them to tf32 on tensor-core GPUs).
    if IEEE:
        acc = tl.dot(a, b, acc=acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc=acc)
    return acc


@triton.jit
def _attend_tile(
    acc,  # [BLOCK_M, BLOCK_D] fp32 running sum of p @ v
    l_i,  # [BLOCK_M] fp32 running softmax denominator
    m_i,  # [BLOCK_M] fp32 running row max of the scores
    q,  # [BLOCK_M, BLOCK_D] query tile, loaded once
    kt_ptrs,  # [BLOCK_D, BLOCK_N] pointers to the first K^T tile
    v_ptrs,  # [BLOCK_N, BLOCK_D] pointers to the first V tile
    mask_ptrs,  # [BLOCK_M, BLOCK_N] (MASK_ROWS) or [BLOCK_N] pointers to the first mask tile
    start_n,  # first key of this tile
    offs_m,  # [BLOCK_M] query rows of this program
    offs_n,  # [BLOCK_N] 0..BLOCK_N-1
    offs_d,  # [BLOCK_D] 0..BLOCK_D-1
    seq_k,
    diag,  # seq_k - seq_q: query i sees keys j <= i + diag (causal, bottom-right aligned)
    score_scale,  # sm_scale, times log2(e) unless ADD_MASK (see below)
    stride_kn,
    stride_vn,
    stride_mn,
    HEAD_DIM: tl.constexpr,
    PAD_D: tl.constexpr,  # BLOCK_D > HEAD_DIM: mask the padded head dims
    ADD_MASK: tl.constexpr,
    KEEP_MASK: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    CAUSAL: tl.constexpr,
    EDGE: tl.constexpr,  # tile may hold keys past seq_k or past the causal diagonal: check each element
    IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = start_n + offs_n
    in_k = cols < seq_k
    in_d = offs_d < HEAD_DIM
    # int64: key offset times a fused-QKV row stride passes 2**31 at long contexts.
    n64 = tl.cast(start_n, tl.int64)
    kt = _load_2d(kt_ptrs + n64 * stride_kn, in_d, in_k, PAD_D, EDGE)
    v = _load_2d(v_ptrs + n64 * stride_vn, in_k, in_d, EDGE, PAD_D)
    qk = _dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE_DOT)
    if ADD_MASK:
        # Natural units here: a finite mask such as finfo(bf16).min would overflow to -inf times log2(e).
        if MASK_ROWS:
            bias = _load_2d(mask_ptrs + n64 * stride_mn, offs_m, in_k, False, EDGE)
        elif EDGE:
            bias = tl.load(mask_ptrs + n64 * stride_mn, mask=in_k, other=0.0)[None, :]
        else:
            bias = tl.load(mask_ptrs + n64 * stride_mn)[None, :]
        s = qk * score_scale + bias.to(tl.float32)
    else:
        # log2 units: the scale and log2(e) are folded into one multiply.
        s = qk * score_scale
    if KEEP_MASK:
        if MASK_ROWS:
            keep = _load_2d(mask_ptrs + n64 * stride_mn, offs_m, in_k, False, EDGE)
        elif EDGE:
            keep = tl.load(mask_ptrs + n64 * stride_mn, mask=in_k, other=0)[None, :]
        else:
            keep = tl.load(mask_ptrs + n64 * stride_mn)[None, :]
        s = tl.where(keep != 0, s, float("-inf"))
    if EDGE:
        visible = in_k[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
        s = tl.where(visible, s, float("-inf"))
    # Online softmax: rescale what was summed so far to the new row max.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if ADD_MASK:
        p = tl.exp2((s - m_new[:, None]) * LOG2E)
        alpha = tl.exp2((m_i - m_new) * LOG2E)
    else:
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    # P in the input dtype for the tensor cores, as flash-attention does; the sum stays fp32.
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE_DOT)
    return acc, l_i, m_new


@triton.jit
def attention_fwd_kernel(
    Q,  # [batch, heads_q, seq_q, head_dim], any strides
    K,  # [batch, heads_kv, seq_k, head_dim], any strides
    V,  # like K
    Mask,  # additive (float) or keep (uint8) mask; broadcast dims have stride 0 (unused without a mask)
    Out,  # [batch, heads_q, seq_q, head_dim]
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    heads_q,
    group,  # heads_q // heads_kv: consecutive q heads share one kv head (GQA), read in place
    seq_q,
    seq_k,
    sm_scale,  # softmax scale, natural units
    HEAD_DIM: tl.constexpr,
    PAD_D: tl.constexpr,  # BLOCK_D > HEAD_DIM (80, 96...): mask the padded head dims
    ADD_MASK: tl.constexpr,  # mask is added to the scores
    KEEP_MASK: tl.constexpr,  # mask is boolean: 0 hides the key
    MASK_ROWS: tl.constexpr,  # mask differs per query row; False (padding masks) loads one row for all
    CAUSAL: tl.constexpr,
    IEEE_DOT: tl.constexpr,  # fp32 inputs: keep fp32 products, no tf32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_inputs(USE_PDL)
    # Axis 0 walks batch * heads so the q heads of one GQA group run side by side and share K/V in L2.
    bh = tl.program_id(0)
    off_b = (bh // heads_q).to(tl.int64)
    off_h = bh % heads_q
    off_hk = (off_h // group).to(tl.int64)
    off_h = off_h.to(tl.int64)
    if CAUSAL:
        # Longest rows first: the last query blocks see the most keys, so they should not finish the grid.
        start_m = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        start_m = tl.program_id(1)
    m0 = start_m * BLOCK_M
    m64 = m0.to(tl.int64)  # block offsets in int64, in-tile offsets in int32
    rows = tl.arange(0, BLOCK_M)
    offs_m = m0 + rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_m = offs_m < seq_q
    in_d = offs_d < HEAD_DIM

    # The query tile is read once and stays in registers for every key tile.
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + m64 * stride_qm
    q = _load_2d(q_ptrs + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, in_m, in_d, True, PAD_D)
    # K is read transposed ([BLOCK_D, BLOCK_N]) so that q @ kt needs no in-register transpose.
    kt_ptrs = K + off_b * stride_kb + off_hk * stride_kh + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
    v_ptrs = V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    # Without a mask these pointers are built but never read (Mask is then any valid pointer).
    mask_base = Mask + off_b * stride_mb + off_h * stride_mh
    if MASK_ROWS:
        # Rows past seq_q read the last real row: the mask load then needs no row check.
        mask_rows = tl.minimum(offs_m, seq_q - 1) - m0
        mask_ptrs = mask_base + m64 * stride_mm + mask_rows[:, None] * stride_mm + offs_n[None, :] * stride_mn
    else:
        mask_ptrs = mask_base + offs_n * stride_mn

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], MAX_FLOOR, dtype=tl.float32)
    if ADD_MASK:
        score_scale = sm_scale
    else:
        score_scale = sm_scale * LOG2E

    # Key range: [0, full_end) needs no per-element check; [full_end, hi) does; keys >= hi are never read.
    diag = seq_k - seq_q
    full_end = (seq_k // BLOCK_N) * BLOCK_N
    hi = seq_k
    if CAUSAL:
        # Row m0, the first of the block, sees keys <= m0 + diag: tiles ending there are whole for every row.
        full_end = tl.minimum((tl.maximum(m0 + diag + 1, 0) // BLOCK_N) * BLOCK_N, full_end)
        # The block's last row sees keys < m0 + BLOCK_M + diag: tiles past the diagonal are skipped.
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + diag, 0), seq_k)

    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, kt_ptrs, v_ptrs, mask_ptrs, start_n, offs_m, offs_n, offs_d, seq_k, diag,
            score_scale, stride_kn, stride_vn, stride_mn,
            HEAD_DIM, PAD_D, ADD_MASK, KEEP_MASK, MASK_ROWS, CAUSAL, False, IEEE_DOT, BLOCK_M, BLOCK_N,
        )  # fmt: skip
    for start_n in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, kt_ptrs, v_ptrs, mask_ptrs, start_n, offs_m, offs_n, offs_d, seq_k, diag,
            score_scale, stride_kn, stride_vn, stride_mn,
            HEAD_DIM, PAD_D, ADD_MASK, KEEP_MASK, MASK_ROWS, CAUSAL, True, IEEE_DOT, BLOCK_M, BLOCK_N,
        )  # fmt: skip

    # A row that saw no key has acc == 0 and l == 0: divide by 1 so it comes out 0, not NaN.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + m64 * stride_om
    o_ptrs += rows[:, None] * stride_om + offs_d[None, :] * stride_od
    if PAD_D:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=in_m[:, None] & in_d[None, :])
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=in_m[:, None])


class AttentionConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@functools.lru_cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def attention_config(
    head_dim: int, seq_q: int, batch_heads: int, dtype: torch.dtype, device: torch.device
) -> AttentionConfig:
    """Tile sizes from head_dim, seq_q and dtype, sized for an H100 (228 KB shared memory, 64K registers an SM).

    One warpgroup (4 warps) per 64 query rows: Hopper's wgmma works on 64-row slices, and at 4 warps for 128
    rows the fp32 accumulator and the pipelined mask tiles spill registers.
    """
    if device.type != "cuda":
        # The interpreter: small unequal tiles, so short test sequences still cross tile and diagonal edges.
        return AttentionConfig(32, 16, 4, 1)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:
        # fp32 dots run on FMA units ("ieee"), which hold both operands in registers: small tiles.
        if block_d <= 64:
            return AttentionConfig(64, 32, 8, 2)
        return AttentionConfig(32, 16, 8, 2) if block_d <= 128 else AttentionConfig(16, 16, 8, 2)
    if block_d > 128:
        # d 256: Q 32 KB + two 32 KB K/V stages; 8 warps split the 64x256 accumulator (~190 registers).
        return AttentionConfig(64, 32, 8, 2)
    if block_d <= 64 and seq_q <= 32 and batch_heads <= 32:
        # Batch-1 inference on short queries: 64-row tiles would give a few dozen programs on 132 SMs. 16-row
        # tiles on one warp (mma, not wgmma) give 4x the programs: 7-23% faster alone at 12 heads on the H100
        # (benchmarks/attention_tiles.py). At seq 128 they won alone too but lost inside bert's graph
        # (profile_graph.py --ab attention: 58.6 against 54.8 µs), so longer queries keep 64-row tiles.
        return AttentionConfig(16, 32, 1, 2)
    if seq_q <= 64 or batch_heads * triton.cdiv(seq_q, 128) < _sm_count(device.index or 0):
        # Short queries, or too few 128-row programs to fill the GPU: 64 rows a program.
        return AttentionConfig(64, 64, 4, 3)
    # Three K/V stages + Q: 64 KB at d 64, 128-160 KB at d 128.
    return AttentionConfig(128, 64, 8, 3)


def launch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """Run the kernel on checked inputs; mask already broadcastable to [batch, heads_q, seq_q, seq_k]."""
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    # Stored [batch, seq, heads, head_dim]: the usual transpose(1, 2).reshape(batch, seq, -1) that follows
    # is then a view, not a copy kernel.
    out = torch.empty((batch, seq_q, heads_q, head_dim), dtype=q.dtype, device=q.device).transpose(1, 2)
    if out.numel() == 0:
        return out
    cfg = config or attention_config(head_dim, seq_q, batch * heads_q, q.dtype, q.device)
    if mask is None:
        mask_arg, mask_strides = q, (0, 0, 0, 0)
    else:
        mask4 = mask[(None,) * (4 - mask.dim())]
        # Size-1 dims broadcast: stride 0 reads the same element again, no expanded copy.
        mask_strides = tuple(0 if mask4.shape[i] == 1 else mask4.stride(i) for i in range(4))
        mask_arg = mask4.view(torch.uint8) if mask.dtype == torch.bool else mask4
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs >= 16; 80 and 96 pad to 128
    grid = (batch * heads_q, triton.cdiv(seq_q, cfg.block_m))
    attention_fwd_kernel[grid](
        q, k, v, mask_arg, out,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        heads_q, heads_q // heads_kv, seq_q, seq_k, scale,
        HEAD_DIM=head_dim,
        PAD_D=block_d != head_dim,
        ADD_MASK=mask is not None and mask.dtype != torch.bool,
        KEEP_MASK=mask is not None and mask.dtype == torch.bool,
        MASK_ROWS=mask_strides[2] != 0,
        CAUSAL=causal,
        IEEE_DOT=q.dtype == torch.float32,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl_options(q),
    )  # fmt: skip
    return out
