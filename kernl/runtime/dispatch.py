"""Check a call's inputs, pick the smallest covering bucket, pad to it, and slice outputs back."""

from __future__ import annotations

from typing import Any

import torch

from kernl.errors import InputError


def _buckets_text(buckets: list[tuple[int, int]]) -> str:
    return ", ".join(f"{b}x{s}" for b, s in buckets)


def check_inputs(given: dict[str, Any], specs: list[dict], buckets: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Validate names, ranks, dtypes and a shared [batch, seq] shape; fill omitted optional inputs."""
    known = {s["name"]: s for s in specs}
    unknown = [n for n in given if n not in known]
    if unknown:
        raise InputError(f"{unknown[0]}: not an input of this bundle (inputs: {', '.join(known)})")
    shape = None
    tensors: dict[str, torch.Tensor] = {}
    for name, value in given.items():
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{name}: expected a tensor, got {type(value).__name__}")
        if value.dim() != known[name]["rank"]:
            raise InputError(f"{name}: expected a [batch, seq] tensor, got shape {tuple(value.shape)}")
        want = getattr(torch, known[name]["dtype"])
        if value.dtype.is_floating_point != want.is_floating_point or value.dtype.is_complex:
            raise InputError(f"{name}: dtype {value.dtype} given, the bundle takes {want}")
        if shape is not None and tuple(value.shape) != shape:
            raise InputError(f"{name}: shape {tuple(value.shape)} differs from the other inputs' {shape}")
        shape = tuple(value.shape)
        tensors[name] = value
    if shape is None:
        raise InputError(f"no inputs given (inputs: {', '.join(known)})")
    for spec in specs:
        if spec["name"] in tensors:
            continue
        if spec["fill"] == "required":
            raise InputError(f"{spec['name']}: missing; this bundle needs it")
        tensors[spec["name"]] = (torch.ones if spec["fill"] == "ones" else torch.zeros)(shape, dtype=torch.long)
    batch, seq = shape
    if batch < 1 or seq < 1:
        raise InputError(f"{specs[0]['name']}: empty shape {shape}")
    return tensors


def pick_bucket(batch: int, seq: int, buckets: list[tuple[int, int]], name: str) -> tuple[int, int]:
    """The covering bucket with the fewest tokens (ties: the shorter sequence)."""
    fits = [b for b in buckets if b[0] >= batch and b[1] >= seq]
    if not fits:
        raise InputError(f"{name}: shape ({batch}, {seq}) exceeds every bucket (buckets: {_buckets_text(buckets)})")
    return min(fits, key=lambda b: (b[0] * b[1], b[1]))


def pad_into(dst: torch.Tensor, src: torch.Tensor, *, is_mask: bool) -> None:
    """Copy src into the top-left of dst and fill the rest.

    Padded positions get 0 (a padded token id, a masked position). A padded batch row of the mask keeps
    its first position visible, so that no attention row is fully masked and nothing can turn into NaN.
    """
    if dst.shape == src.shape:  # an exact fit: one copy kernel instead of fill + copy
        dst.copy_(src)
        return
    b, s = src.shape
    dst.zero_()
    dst[:b, :s].copy_(src)
    if is_mask and dst.shape[0] > b:
        dst[b:, 0] = 1


def fill_inputs(dsts: list[torch.Tensor], srcs: list[torch.Tensor], names: list[str]) -> None:
    """pad_into for each input; where every input fits its buffer exactly, one copy launch for all."""
    if all(d.shape == s.shape and d.dtype == s.dtype and d.device == s.device for d, s in zip(dsts, srcs)):
        torch._foreach_copy_(dsts, srcs)
        return
    for name, dst, src in zip(names, dsts, srcs):
        pad_into(dst, src, is_mask=name == "attention_mask")


def slice_output(out: torch.Tensor, dims: list, batch: int, seq: int) -> torch.Tensor:
    index = tuple(slice(0, batch) if d == "batch" else slice(0, seq) if d == "seq" else slice(None) for d in dims)
    return out[index]
