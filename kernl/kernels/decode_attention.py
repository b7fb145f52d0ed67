"""Decode attention: one query token per row over a static KV cache, each row at its own length.

The cache is [rows, heads_kv, max_len, head_dim] (the layout DESIGN.md gives per layer): one kv head's
positions are then one contiguous run of memory, so a tile of BLOCK_N positions is a single contiguous
block of BLOCK_N * head_dim elements, every load fully coalesced, and the append of one position is
heads_kv short contiguous writes. Lengths and positions are device tensors: one captured CUDA graph serves
every step, and a row reads no more of the cache than it holds.
"""

from __future__ import annotations

import torch

from kernl.kernels._backend import HAS_TRITON, check_tensor, runs_triton
from kernl.kernels._custom_ops import custom_op

if HAS_TRITON:
    from kernl.kernels._decode_attention_kernel import launch_cache_append, launch_decode_attention

MAX_HEAD_DIM = 256
INDEX_DTYPES = (torch.int32, torch.int64)


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    check_tensor("k_cache", k_cache, ndim=4, like=q)
    check_tensor("v_cache", v_cache, ndim=4, like=q)
    batch, heads_q, head_dim = q.shape
    rows, heads_kv, _, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"k_cache: head_dim {cache_dim} (shape {tuple(k_cache.shape)}) differs from q's {head_dim}")
    if rows < batch:
        raise ValueError(f"k_cache: {rows} rows (shape {tuple(k_cache.shape)}) for a batch of {batch}")
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"k_cache: heads_q ({heads_q}) must be a multiple of heads_kv ({heads_kv})")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: shape {tuple(v_cache.shape)} differs from k_cache's {tuple(k_cache.shape)}")


def _check_index(name: str, t: torch.Tensor, q: torch.Tensor) -> None:
    check_tensor(name, t, ndim=1, dtypes=INDEX_DTYPES)
    if t.device != q.device:
        raise ValueError(f"{name}: on {t.device}, but the input is on {q.device}")
    if t.shape[0] != q.shape[0]:
        raise ValueError(f"{name}: shape {tuple(t.shape)} does not match the batch of {q.shape[0]}")


def _check_new(q: torch.Tensor, k_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    check_tensor("k_new", k_new, ndim=3, like=q)
    check_tensor("v_new", v_new, ndim=3, like=q)
    want = (q.shape[0], k_cache.shape[1], k_cache.shape[3])
    if tuple(k_new.shape) != want:
        raise ValueError(f"k_new: shape {tuple(k_new.shape)}, expected [batch, heads_kv, head_dim] = {want}")
    if v_new.shape != k_new.shape:
        raise ValueError(f"v_new: shape {tuple(v_new.shape)} differs from k_new's {tuple(k_new.shape)}")


def check_decode_attention_args(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor
) -> None:
    """Shapes, dtypes and devices of decode_attention's inputs; raises a ValueError naming the argument."""
    check_tensor("q", q, ndim=3)
    if not 1 <= q.shape[2] <= MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim must be in 1..{MAX_HEAD_DIM}, got shape {tuple(q.shape)}")
    _check_cache(q, k_cache, v_cache)
    _check_index("lengths", lengths, q)


def check_cache_append_args(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor
) -> None:
    """Shapes, dtypes and devices of cache_append's inputs; raises a ValueError naming the argument."""
    check_tensor("k_new", k_new, ndim=3)
    check_tensor("k_cache", k_cache, ndim=4, like=k_new)
    check_tensor("v_cache", v_cache, ndim=4, like=k_new)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: shape {tuple(v_cache.shape)} differs from k_cache's {tuple(k_cache.shape)}")
    if k_cache.shape[0] < k_new.shape[0]:
        raise ValueError(
            f"k_cache: {k_cache.shape[0]} rows (shape {tuple(k_cache.shape)}) for a batch of {k_new.shape[0]}"
        )
    _check_new(k_new, k_cache, k_new, v_new)
    _check_index("positions", positions, k_new)


def _lengths_of(positions: torch.Tensor, max_len: int) -> torch.Tensor:
    return (positions.long() + 1).clamp(0, max_len)


def decode_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Plain torch in fp32: row b attends to positions [0, lengths[b]) of cache row b; kv heads repeated.

    Positions past a row's length are never used, whatever they hold (NaN included); a row of length 0
    gives zeros. Lengths are clamped to [0, max_len], as the kernel does.
    """
    batch, heads_q, head_dim = q.shape
    heads_kv, max_len = k_cache.shape[1], k_cache.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    group = heads_q // heads_kv
    valid = torch.arange(max_len, device=q.device)[None, :] < lengths.long().clamp(0, max_len)[:, None]
    keep = valid[:, None, :, None]  # [batch, 1, max_len, 1]
    k = torch.where(keep, k_cache[:batch].float(), 0.0).repeat_interleave(group, dim=1)
    v = torch.where(keep, v_cache[:batch].float(), 0.0).repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhnd->bhn", q.float(), k) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(valid.any(-1)[:, None, None], probs, 0.0)
    return torch.einsum("bhn,bhnd->bhd", probs, v).to(q.dtype)


def cache_append_reference(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor
) -> None:
    """In place: cache row b, every kv head, position positions[b] <- k_new[b], v_new[b]; out-of-range: no write."""
    max_len = k_cache.shape[2]
    for b, pos in enumerate(positions.tolist()):
        if 0 <= pos < max_len:
            k_cache[b, :, pos] = k_new[b]
            v_cache[b, :, pos] = v_new[b]


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of one query token per row over a static KV cache, split-K ("flash-decoding").

    q: [batch, heads_q, head_dim], any strides. k_cache, v_cache: [rows, heads_kv, max_len, head_dim] with
    rows >= batch (row b of q reads cache row b), heads_q % heads_kv == 0 (q head h reads kv head
    h // (heads_q // heads_kv)), any strides (contiguous is fastest: see the module docstring); head_dim up
    to 256. lengths: [batch] int32 or int64 on q's device, the valid positions of each row; row b attends
    to [0, lengths[b]) and nothing past it is read. A length of 0 gives zeros; lengths are clamped to
    [0, max_len]. No host sync: the same call can be captured once and replayed with new lengths.
    scale: default head_dim ** -0.5. Returns a new contiguous [batch, heads_q, head_dim] in q's dtype.
    """
    check_decode_attention_args(q, k_cache, v_cache, lengths)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not runs_triton(q):
        return decode_attention_reference(q, k_cache, v_cache, lengths, scale)
    return launch_decode_attention(q, k_cache, v_cache, lengths, None, None, scale)


def cache_append(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor
) -> None:
    """In place: write each row's new key and value into the cache at that row's position, every kv head.

    k_cache, v_cache: [rows, heads_kv, max_len, head_dim], rows >= batch, any strides. k_new, v_new:
    [batch, heads_kv, head_dim], same dtype and device, any strides. positions: [batch] int32 or int64 on
    the same device; a position outside [0, max_len) writes nothing. One launch, no host sync.
    """
    check_cache_append_args(k_cache, v_cache, k_new, v_new, positions)
    if not runs_triton(k_new):
        cache_append_reference(k_cache, v_cache, k_new, v_new, positions)
        return
    launch_cache_append(k_cache, v_cache, k_new, v_new, positions)


def decode_attention_append(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    positions: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """A decode step's attention in one kernel: cache_append at positions, then decode_attention over
    [0, positions[b]] inclusive (lengths = positions + 1).

    Shapes as in decode_attention and cache_append. The new token's key and value are used from k_new/v_new
    (rounded to the cache dtype) and written to the cache by the one program that reads that position, so
    the step needs no separate append launch. A position < 0 gives zeros and writes nothing (an idle row);
    a position >= max_len writes nothing and attends over the whole cache.
    """
    check_decode_attention_args(q, k_cache, v_cache, positions)
    _check_new(q, k_cache, k_new, v_new)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not runs_triton(q):
        cache_append_reference(k_cache, v_cache, k_new, v_new, positions)
        return decode_attention_reference(q, k_cache, v_cache, _lengths_of(positions, k_cache.shape[2]), scale)
    return launch_decode_attention(q, k_cache, v_cache, positions, k_new, v_new, scale)


def cache_fill(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor
) -> None:
    """In place: a prefill's keys and values into the cache, row b of k/v into cache row rows[b], positions
    [0, seq). k_cache, v_cache: [rows_max, heads_kv, max_len, head_dim]; k, v: [batch, heads_kv, seq, head_dim],
    any strides, seq <= max_len; rows: [batch] int64 on the cache's device, each in [0, rows_max) (a padded
    row of a batch bucket points at a scratch row nothing reads). One copy kernel per tensor, no host sync."""
    check_tensor("k", k, ndim=4)
    check_tensor("k_cache", k_cache, ndim=4, like=k)
    check_tensor("v_cache", v_cache, ndim=4, like=k)
    check_tensor("v", v, ndim=4, like=k)
    seq = k.shape[2]
    if k.shape[1] != k_cache.shape[1] or k.shape[3] != k_cache.shape[3] or seq > k_cache.shape[2]:
        raise ValueError(f"k: shape {tuple(k.shape)} does not fit the cache {tuple(k_cache.shape)}")
    if v.shape != k.shape or v_cache.shape != k_cache.shape:
        raise ValueError(f"v, v_cache: shapes {tuple(v.shape)}, {tuple(v_cache.shape)} differ from k's, k_cache's")
    check_tensor("rows", rows, ndim=1, dtypes=(torch.int64,))
    if rows.shape[0] != k.shape[0] or rows.device != k.device:
        raise ValueError(f"rows: shape {tuple(rows.shape)} on {rows.device}, expected [{k.shape[0]}] on {k.device}")
    k_cache[:, :, :seq].index_copy_(0, rows, k)
    v_cache[:, :, :seq].index_copy_(0, rows, v)


def cache_fill_call(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor
) -> None:
    cache_fill(k_cache, v_cache, k, v, rows)


def decode_attention_call(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, scale: float | None
) -> torch.Tensor:
    return decode_attention(q, k_cache, v_cache, lengths, scale=scale)


def cache_append_call(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor
) -> None:
    cache_append(k_cache, v_cache, k_new, v_new, positions)


def decode_attention_append_call(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    positions: torch.Tensor,
    scale: float | None,
) -> torch.Tensor:
    return decode_attention_append(q, k_cache, v_cache, k_new, v_new, positions, scale=scale)


decode_attention_op = custom_op("kernl::decode_attention", decode_attention_call, mutates_args=())
cache_append_op = custom_op("kernl::cache_append", cache_append_call, mutates_args=("k_cache", "v_cache"))
cache_fill_op = custom_op("kernl::cache_fill", cache_fill_call, mutates_args=("k_cache", "v_cache"))
decode_attention_append_op = custom_op(
    "kernl::decode_attention_append", decode_attention_append_call, mutates_args=("k_cache", "v_cache")
)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, lengths, scale):
    return q.new_empty(q.shape)


@cache_append_op.register_fake
def _(k_cache, v_cache, k_new, v_new, positions):
    return None


@cache_fill_op.register_fake
def _(k_cache, v_cache, k, v, rows):
    return None


@decode_attention_append_op.register_fake
def _(q, k_cache, v_cache, k_new, v_new, positions, scale):
    return q.new_empty(q.shape)
