"""Triton kernel behind rotary: rotate-half position embedding of q and k in one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernl.kernels._pdl import pdl_options, wait_for_inputs


@triton.jit
def _rotate_heads(
    X,  # this token's row of the first head of q or k; heads and dims follow by stride
    Y,  # the matching output row; dims contiguous
    C,  # this token's cos row [rot_dim]
    S,  # this token's sin row [rot_dim]
    head0,  # first head of this program's block
    n_heads,  # heads in this tensor: the block's tail may run past it
    stride_xh,
    stride_xd,  # 1 for ordinary views; Triton specialises on 1, so loads still vectorise
    stride_yh,
    stride_c,
    stride_s,
    HALF: tl.constexpr,  # rot_dim // 2: dim i pairs with dim i + HALF
    HEAD_DIM: tl.constexpr,
    HAS_PASS: tl.constexpr,  # rot_dim < head_dim: partial rotary, the tail dims pass through
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    heads = head0 + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    in_half = i < HALF
    # HF indexes cos/sin by output dim, so read both halves rather than assume cat(freqs, freqs).
    c1 = tl.load(C + i * stride_c, mask=in_half, other=0.0).to(tl.float32)
    c2 = tl.load(C + (i + HALF) * stride_c, mask=in_half, other=0.0).to(tl.float32)
    s1 = tl.load(S + i * stride_s, mask=in_half, other=0.0).to(tl.float32)
    s2 = tl.load(S + (i + HALF) * stride_s, mask=in_half, other=0.0).to(tl.float32)
    head_ok = (heads < n_heads)[:, None]
    mask = head_ok & in_half[None, :]
    # Head offsets in int64: heads * stride overflows int32 at long sequences.
    x_rows = X + heads.to(tl.int64)[:, None] * stride_xh
    y_rows = Y + heads.to(tl.int64)[:, None] * stride_yh
    # Both halves of every head in this block, in fp32: each output dim needs its partner.
    x1 = tl.load(x_rows + i[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + (i[None, :] + HALF) * stride_xd, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1).
    y1 = x1 * c1[None, :] - x2 * s1[None, :]
    y2 = x2 * c2[None, :] + x1 * s2[None, :]
    tl.store(y_rows + i[None, :], y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_rows + (i[None, :] + HALF), y2.to(Y.dtype.element_ty), mask=mask)
    if HAS_PASS:
        # Dims past rot_dim are copied in the input dtype: bit-exact, as HF's concat leaves them.
        p = 2 * HALF + tl.arange(0, BLOCK_PASS)
        p_mask = head_ok & (p < HEAD_DIM)[None, :]
        tail = tl.load(x_rows + p[None, :] * stride_xd, mask=p_mask)
        tl.store(y_rows + p[None, :], tail, mask=p_mask)


@triton.jit
def rotary_kernel(
    Q,  # queries [batch, heads_q, seq, head_dim], any strides
    K,  # keys [batch, heads_k, seq, head_dim], any strides
    QO,  # rotated queries, like Q; head_dim contiguous
    KO,  # rotated keys, like K; head_dim contiguous
    COS,  # [batch, seq, rot_dim]; batch stride 0 when one row set serves the whole batch
    SIN,  # like COS
    seq,
    heads_q,
    heads_k,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_qob,
    stride_qoh,
    stride_qos,
    stride_kob,
    stride_koh,
    stride_kos,
    stride_cb,
    stride_cs,
    stride_cd,
    stride_sb,
    stride_ss,
    stride_sd,
    HALF: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_PASS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_inputs(USE_PDL)
    # Axis 0 walks tokens: a token's cos/sin row is read once and shared by a block of heads.
    token = tl.program_id(0).to(tl.int64)
    b = token // seq
    s = token % seq
    c = COS + b * stride_cb + s * stride_cs
    sn = SIN + b * stride_sb + s * stride_ss
    # Axis 1 walks head blocks, q's first and then k's, so one launch rotates both tensors.
    block = tl.program_id(1)
    q_blocks = tl.cdiv(heads_q, BLOCK_H)
    if block < q_blocks:
        _rotate_heads(
            Q + b * stride_qb + s * stride_qs,
            QO + b * stride_qob + s * stride_qos,
            c,
            sn,
            block * BLOCK_H,
            heads_q,
            stride_qh,
            stride_qd,
            stride_qoh,
            stride_cd,
            stride_sd,
            HALF,
            HEAD_DIM,
            HAS_PASS,
            BLOCK_H,
            BLOCK_HALF,
            BLOCK_PASS,
        )
    else:
        _rotate_heads(
            K + b * stride_kb + s * stride_ks,
            KO + b * stride_kob + s * stride_kos,
            c,
            sn,
            (block - q_blocks) * BLOCK_H,
            heads_k,
            stride_kh,
            stride_kd,
            stride_koh,
            stride_cd,
            stride_sd,
            HALF,
            HEAD_DIM,
            HAS_PASS,
            BLOCK_H,
            BLOCK_HALF,
            BLOCK_PASS,
        )


def launch_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
) -> None:
    """Write rotary(q, k) into q_out, k_out (last dim contiguous); inputs already checked by the caller."""
    batch, heads_q, seq, head_dim = q.shape
    heads_k = k.shape[1]
    rot = cos.shape[-1]
    if batch * seq == 0 or heads_q + heads_k == 0:
        return
    # [seq, rot] or [1 or batch, seq, rot] to [batch, seq, rot]: broadcast rows get stride 0, no copy.
    cos = cos.expand(batch, seq, rot)
    sin = sin.expand(batch, seq, rot)
    half = rot // 2
    has_pass = rot < head_dim
    block_half = triton.next_power_of_2(half)
    block_pass = triton.next_power_of_2(head_dim - rot) if has_pass else 1
    block_d = 2 * block_half + (block_pass if has_pass else 0)
    # About 1K elements a program (8 heads of 128 dims), but no more heads than the larger tensor has.
    block_h = min(triton.next_power_of_2(max(heads_q, heads_k)), max(1, 1024 // block_d))
    num_warps = min(max(block_h * block_d // 256, 1), 8)
    grid = (batch * seq, triton.cdiv(heads_q, block_h) + triton.cdiv(heads_k, block_h))
    rotary_kernel[grid](
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        seq,
        heads_q,
        heads_k,
        *q.stride(),
        *k.stride(),
        q_out.stride(0),
        q_out.stride(1),
        q_out.stride(2),
        k_out.stride(0),
        k_out.stride(1),
        k_out.stride(2),
        *cos.stride(),
        *sin.stride(),
        HALF=half,
        HEAD_DIM=head_dim,
        HAS_PASS=has_pass,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        BLOCK_PASS=block_pass,
        num_warps=num_warps,
        **pdl_options(q_out),
    )
