"""One Triton kernel for a row-parallel output's sum over ranks, the residual add and the RMS norm after it.

Each rank's workspace is memory every rank of the host can address (PyTorch symmetric memory over NVLink): two
halves of row slots [2, SLOTS, MAX_WORLD, ROW_CAP_BYTES], one place per row and sending rank, every element
"empty" (-0.0) until written. Program `row` of every rank:
1. writes its partial row into its place in every rank's slot `row` (its own too), in the half picked by how
   often it has used the slot (counters); a -0.0 of its own is sent as +0.0, which sums the same. Remote stores
   are posted: nothing waits for them;
2. reads every rank's place in its own slot, all at once, until no element is empty: the data is its own signal,
   so a call costs one NVLink write latency, with no flag, fence or round trip; then it empties those places;
3. sums the rows in fp32, in the same order on every rank, so every rank holds the same bits, adds the residual
   and normalises, as norm_kernel does.
Two halves make reuse safe: a peer writes into a half again only two calls of the slot later, and it cannot get
there before this rank's next call has written to it, which starts after this call (and its emptying) ended.

PUSHED: the row-parallel GEMV before the kernel has already written every rank's places, this rank's own included
(_gemv_push_kernel), as each of its programs finished. Step 1 goes, and the kernel waits for the GEMV (PDL) only
once its places are full: the sum's NVLink latency then runs from the GEMV's last store instead of from after its
end, the kernel's start and the reload of the partial.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernl.kernels._pdl import wait_for_inputs

SLOTS = 32  # rows a call may have: decode up to batch 32
EMPTY_BITS = {2: -(2**15), 4: -(2**31)}  # -0.0 as a signed integer, by element size
MAX_WORLD = 8
ROW_CAP_BYTES = 32 * 1024  # a row's place: hidden 16384 in bf16
WORKSPACE_BYTES = 2 * SLOTS * MAX_WORLD * ROW_CAP_BYTES
TIMEOUT_NS = 300 * 10**9  # a peer that never arrives traps the kernel (an error, not a hang) after 5 minutes

# The same numbers as the kernel sees them (Triton reads only constexpr globals).
_SLOTS = tl.constexpr(SLOTS)
_MAX_WORLD = tl.constexpr(MAX_WORLD)
_ROW_CAP_BYTES = tl.constexpr(ROW_CAP_BYTES)
_TIMEOUT_NS = tl.constexpr(TIMEOUT_NS)
_EMPTY_16 = tl.constexpr(EMPTY_BITS[2])
_EMPTY_32 = tl.constexpr(EMPTY_BITS[4])


@triton.jit
def _now_ns(anchor, ON_GPU: tl.constexpr):
    # anchor: any int32 scalar; inline asm takes at least one operand on every Triton kernl supports.
    if ON_GPU:
        return tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l,r", [anchor], dtype=tl.int64, is_pure=False, pack=1
        )
    else:
        return anchor.to(tl.int64) * 0


@triton.jit
def _give_up(anchor, ON_GPU: tl.constexpr):
    if ON_GPU:
        tl.inline_asm_elementwise("trap;\n\tmov.u32 $0, 0;", "=r,r", [anchor], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _empty_mask(v, BITS: tl.constexpr):
    # -0.0: the sign bit alone
    if BITS == 16:
        return v.to(tl.int16, bitcast=True) == _EMPTY_16
    else:
        return v.to(tl.int32, bitcast=True) == _EMPTY_32


@triton.jit
def _empty(ROWS: tl.constexpr, BLOCK_N: tl.constexpr, dtype: tl.constexpr, BITS: tl.constexpr):
    if BITS == 16:
        return tl.full([ROWS, BLOCK_N], _EMPTY_16, tl.int16).to(dtype, bitcast=True)
    else:
        return tl.full([ROWS, BLOCK_N], _EMPTY_32, tl.int32).to(dtype, bitcast=True)


@triton.jit(do_not_specialize=["rank", "world"])
def peer_add_rms_norm_kernel(
    X,  # this rank's partial rows [M, N], last dim contiguous
    R,  # residual rows [M, N]
    W,  # norm weight [N]
    Y,  # normalised output [M, N]
    S,  # sum over ranks + residual [M, N]: the next residual stream
    stride_x,
    stride_r,
    stride_y,
    stride_s,
    bases,  # int64 [world]: each rank's workspace address, this rank's included
    counters,  # int32 [SLOTS]: this rank's uses of each slot so far
    rank,
    world,
    N,
    eps,
    weight_offset,
    ON_GPU: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WORLD_P2: tl.constexpr,  # world rounded up to a power of two: the rows of the tile of places
    USE_PDL: tl.constexpr,
    PUSHED: tl.constexpr = False,  # the GEMV before wrote every place, this rank's own too (X unused)
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < N
    dtype = Y.dtype.element_ty
    BITS: tl.constexpr = dtype.primitive_bitwidth
    if not PUSHED:
        wait_for_inputs(USE_PDL)
    # PUSHED, the slot's last call ended before the GEMV before this kernel started: no wait needed to read it.
    use = tl.load(counters + row)
    slot_bytes = ((use % 2) * _SLOTS + row).to(tl.int64) * (_MAX_WORLD * _ROW_CAP_BYTES)
    if not PUSHED:
        x = tl.load(X + row.to(tl.int64) * stride_x + cols, mask=in_row, other=0.0)
        x = tl.where(_empty_mask(x, BITS), tl.zeros([BLOCK_N], dtype=dtype), x)  # -0.0 marks empty: send +0.0
        for peer in range(world):  # its own place too, so that every rank's row is read the same way
            place = (tl.load(bases + peer) + slot_bytes + rank * _ROW_CAP_BYTES).to(tl.pointer_type(dtype))
            tl.store(tl.multiple_of(place, 16) + cols, x, mask=in_row)

    # Every rank's place at once, a tile row per sender in rank order, reloaded until no element is empty: the
    # loads of all places are in flight together, where a poll per sender would wait for each in turn.
    senders = tl.arange(0, WORLD_P2)
    starts = (tl.load(bases + rank) + slot_bytes + senders.to(tl.int64) * _ROW_CAP_BYTES).to(tl.pointer_type(dtype))
    places = tl.multiple_of(starts, 16)[:, None] + cols[None, :]
    sent = (senders[:, None] < world) & in_row[None, :]
    start = _now_ns(row, ON_GPU)
    parts = tl.load(places, mask=sent, other=1.0, volatile=True)
    while tl.sum(tl.sum(_empty_mask(parts, BITS).to(tl.int32), axis=1), axis=0) > 0:
        if _now_ns(row, ON_GPU) - start > _TIMEOUT_NS:
            _give_up(row, ON_GPU)
        parts = tl.load(places, mask=sent, other=1.0, volatile=True)
    tl.store(places, _empty(WORLD_P2, BLOCK_N, dtype, BITS), mask=sent)
    total = tl.sum(tl.where(sent, parts.to(tl.float32), 0.0), axis=0)  # masked: the 1.0 that ends the poll
    if PUSHED:
        wait_for_inputs(USE_PDL)  # the GEMV has ended (its last stores are in): the outputs may reuse its memory
    tl.store(counters + row, use + 1)

    # The sum is rounded as an all-reduce's output would be, then the residual is added in fp32.
    s = total.to(dtype).to(tl.float32)
    s += tl.load(R + row.to(tl.int64) * stride_r + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(S + row.to(tl.int64) * stride_s + cols, s.to(S.dtype.element_ty), mask=in_row)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / N + eps)
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32) + weight_offset
    tl.store(Y + row.to(tl.int64) * stride_y + cols, (s * rstd * w).to(Y.dtype.element_ty), mask=in_row)
