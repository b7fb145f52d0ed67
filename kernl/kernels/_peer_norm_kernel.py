"""One Triton kernel for a row-parallel output's sum over ranks, the residual add and the RMS norm after it.

Each rank's workspace is memory every rank of the host can address (PyTorch symmetric memory over NVLink):
int32 flags [SLOTS, MAX_WORLD], then two halves of row slots [2, SLOTS, MAX_WORLD, ROW_CAP_BYTES], one slot per
row and sending rank. Program `row` of every rank owns slot `row`:
1. it writes its partial row into its place in every rank's slot (remote stores are posted: nothing waits for
   them, where reading the peers' rows would wait a round trip each), in the half picked by how often it has used
   the slot (counters);
2. it adds 1 to its flag in every rank's workspace (release) and waits until every rank's flag in its own is
   at least 1, then takes 1 off (acquire): the flags return to 0, so a CUDA graph replays the kernel as it is;
3. it sums the rows in its own slot in rank order in fp32, so every rank holds the same bits, then adds the
   residual and normalises, as norm_kernel does.
Two halves make reuse safe: a rank writes a half again only two uses of the slot later, and between them the
other half's barrier proves that every peer finished the kernel that read it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernl.kernels._pdl import wait_for_inputs

SLOTS = 32  # rows a call may have: decode up to batch 32
MAX_WORLD = 8
FLAGS_BYTES = 4096  # SLOTS * MAX_WORLD int32 flags, rounded up so the rows start aligned
ROW_CAP_BYTES = 32 * 1024  # a row's slot: hidden 16384 in bf16
WORKSPACE_BYTES = FLAGS_BYTES + 2 * SLOTS * MAX_WORLD * ROW_CAP_BYTES
TIMEOUT_NS = 300 * 10**9  # a peer that never arrives traps the kernel (an error, not a hang) after 5 minutes

# The same numbers as the kernel sees them (Triton reads only constexpr globals).
_SLOTS = tl.constexpr(SLOTS)
_MAX_WORLD = tl.constexpr(MAX_WORLD)
_FLAGS_BYTES = tl.constexpr(FLAGS_BYTES)
_ROW_CAP_BYTES = tl.constexpr(ROW_CAP_BYTES)
_TIMEOUT_NS = tl.constexpr(TIMEOUT_NS)


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
def _fence_system(anchor, ON_GPU: tl.constexpr):
    # Each thread's stores to its slot become visible to other GPUs before the flag that announces them.
    if ON_GPU:
        tl.inline_asm_elementwise(
            "fence.acq_rel.sys;\n\tmov.u32 $0, 0;", "=r,r", [anchor], dtype=tl.int32, is_pure=False, pack=1
        )


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
    counters,  # int32 [_SLOTS]: this rank's uses of each slot so far
    rank,
    world,
    N,
    eps,
    weight_offset,
    ON_GPU: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_inputs(USE_PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < N
    dtype = X.dtype.element_ty
    x = tl.load(X + row.to(tl.int64) * stride_x + cols, mask=in_row, other=0.0)
    use = tl.load(counters + row)
    slot_bytes = _FLAGS_BYTES + ((use % 2) * _SLOTS + row).to(tl.int64) * (_MAX_WORLD * _ROW_CAP_BYTES)
    own = tl.load(bases + rank)
    for peer in range(world):
        place = (tl.load(bases + peer) + slot_bytes + rank * _ROW_CAP_BYTES).to(tl.pointer_type(dtype))
        tl.store(tl.multiple_of(place, 16) + cols, x, mask=in_row)
    _fence_system(row, ON_GPU)
    tl.debug_barrier()

    # Counting flags: a rank may raise a flag again (its next call) before its peer has taken the last one down;
    # a count never passes 2, since a rank's next-but-one call needs its peer's next signal first.
    for peer in range(world):
        theirs = (tl.load(bases + peer) + (row * _MAX_WORLD + rank) * 4).to(tl.pointer_type(tl.int32))
        tl.atomic_add(theirs, 1, sem="release", scope="sys")  # posted: nothing waits for the answer
    start = _now_ns(row, ON_GPU)
    for peer in range(world):
        mine = (own + (row * _MAX_WORLD + peer) * 4).to(tl.pointer_type(tl.int32))
        while tl.atomic_add(mine, 0, sem="acquire", scope="sys") < 1:
            if _now_ns(row, ON_GPU) - start > _TIMEOUT_NS:
                _give_up(row, ON_GPU)
        tl.atomic_add(mine, -1, sem="relaxed", scope="sys")
    tl.debug_barrier()

    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for peer in range(world):
        place = tl.multiple_of((own + slot_bytes + peer * _ROW_CAP_BYTES).to(tl.pointer_type(dtype)), 16)
        total += tl.load(place + cols, mask=in_row, other=0.0, cache_modifier=".cv").to(tl.float32)
    tl.store(counters + row, use + 1)

    # The sum is rounded as an all-reduce's output would be, then the residual is added in fp32.
    s = total.to(dtype).to(tl.float32)
    s += tl.load(R + row.to(tl.int64) * stride_r + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(S + row.to(tl.int64) * stride_s + cols, s.to(S.dtype.element_ty), mask=in_row)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / N + eps)
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32) + weight_offset
    tl.store(Y + row.to(tl.int64) * stride_y + cols, (s * rstd * w).to(Y.dtype.element_ty), mask=in_row)
