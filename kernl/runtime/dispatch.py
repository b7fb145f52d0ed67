"""Check a call's inputs, pick the smallest covering bucket, pad to it, and slice outputs back."""

from __future__ import annotations

from typing import Any

import torch

from kernl.errors import InputError


def _buckets_text(buckets: list[tuple[int, int]]) -> str:
    return ", ".join(f"{b}x{s}" for b, s in buckets)


# What a call may pass for an input of each kind; anything else is an InputError on every device. Values are
# copied into buffers of the input's own dtype, so a narrower integer or float is accepted as it is.
_SIGNED = (torch.int8, torch.int16, torch.int32, torch.int64)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Indices (token, type and position ids) are signed integers: torch reads bool and uint8 index tensors as masks.
_INDEX_DTYPES = _SIGNED
_INTEGER_DTYPES = (torch.bool, torch.uint8, *_SIGNED)  # masks may be bool
# The device kinds kernl runs on; an input on either is copied to the bundle's device.
_DEVICES = ("cpu", "cuda")


def accepted_dtypes(spec: dict) -> tuple[torch.dtype, ...]:
    """The dtypes a call may pass for the input of this spec (its own among them). An input that indexes a table
    (a "limit", or named like input_ids) takes signed integers only."""
    if "limit" in spec or spec["name"].endswith("_ids"):
        return _INDEX_DTYPES
    want = getattr(torch, spec["dtype"])
    if want.is_floating_point:
        return _FLOATS
    return _INTEGER_DTYPES


def check_inputs(given: dict[str, Any], specs: list[dict], buckets: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Validate names, ranks, dtypes, devices, a shared [batch, seq] shape (fixed-shape inputs: the batch and their
    fixed sizes, spec "dims"), and the values of inputs that index a table (a spec's "limit": token ids against the
    vocabulary); fill omitted optional inputs.

    The same call is accepted or refused whatever the bundle's device: the checks read the call only.
    """
    known = {s["name"]: s for s in specs}
    unknown = [n for n in given if n not in known]
    if unknown:
        raise InputError(f"{unknown[0]}: not an input of this bundle (inputs: {', '.join(known)})")
    shape = batch = None
    tensors: dict[str, torch.Tensor] = {}
    for name, value in given.items():
        if value is None:
            continue
        _check_tensor(name, value, known[name])
        if batch is not None and value.shape[0] != batch:
            raise InputError(f"{name}: batch {value.shape[0]} differs from the other inputs' {batch}")
        batch = value.shape[0]
        if "dims" not in known[name]:
            if shape is not None and tuple(value.shape) != shape:
                raise InputError(f"{name}: shape {tuple(value.shape)} differs from the other inputs' {shape}")
            shape = tuple(value.shape)
        tensors[name] = value
    if batch is None:
        raise InputError(f"no inputs given (inputs: {', '.join(known)})")
    for spec in specs:
        if spec["name"] in tensors:
            continue
        if spec["fill"] == "required" or shape is None:
            raise InputError(f"{spec['name']}: missing; this bundle needs it")
        tensors[spec["name"]] = (torch.ones if spec["fill"] == "ones" else torch.zeros)(shape, dtype=torch.long)
    if batch < 1 or (shape is not None and shape[1] < 1):
        raise InputError(f"{specs[0]['name']}: empty shape {tuple(next(iter(tensors.values())).shape)}")
    check_values(tensors, specs)
    return tensors


def call_shape(tensors: dict[str, torch.Tensor], specs: list[dict]) -> tuple[int, int]:
    """(batch, seq) of a checked call: seq of its [batch, seq] inputs, or for a program whose inputs all have a
    fixed shape, its window (their last dim), which every bucket's seq equals."""
    by_name = {s["name"]: s for s in specs}
    first = next(iter(tensors.values()))
    seq_inputs = [t for n, t in tensors.items() if "dims" not in by_name.get(n, {})]
    if seq_inputs:
        return int(seq_inputs[0].shape[0]), int(seq_inputs[0].shape[1])
    return int(first.shape[0]), int(first.shape[-1])


def input_shape(spec: dict, bucket: tuple[int, int]) -> tuple[int, ...]:
    """The shape of an input's buffer in a bucket: the bucket itself for [batch, seq], [batch, *fixed] for a
    fixed-shape input."""
    dims = spec.get("dims")
    if dims is None:
        return tuple(bucket)
    return (bucket[0], *dims[1:])


def _check_tensor(name: str, value: Any, spec: dict) -> None:
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{name}: expected a tensor, got {type(value).__name__}")
    if value.device.type == "meta":
        raise InputError(f"{name}: a meta tensor holds no values; pass a tensor on the CPU or on CUDA")
    if value.device.type not in _DEVICES:
        raise InputError(f"{name}: on device {value.device}; kernl takes tensors on the CPU or on CUDA")
    if value.layout != torch.strided or value.is_nested or value.is_quantized:
        raise InputError(f"{name}: a {value.layout} tensor; kernl takes dense (strided) tensors")
    dims = spec.get("dims")
    if dims is not None:
        want = ", ".join(str(d) for d in dims)
        if value.dim() != len(dims) or list(value.shape[1:]) != list(dims[1:]):
            raise InputError(f"{name}: expected shape [{want}], got {tuple(value.shape)}")
    elif value.dim() != spec["rank"]:
        raise InputError(f"{name}: expected a [batch, seq] tensor, got shape {tuple(value.shape)}")
    accepted = accepted_dtypes(spec)
    if value.dtype not in accepted:
        names = ", ".join(str(d).removeprefix("torch.") for d in accepted)
        raise InputError(f"{name}: dtype {value.dtype} given; this bundle takes {spec['dtype']} ({names} accepted)")


def check_values(tensors: dict[str, torch.Tensor], specs: list[dict]) -> None:
    """Every value of an input with a "limit" lies in [0, limit): an index outside its table would read out of
    bounds (on CUDA, a device-side assert that breaks the whole process's CUDA context).

    Host tensors are checked on the host (a few microseconds; nothing waits on the GPU). Inputs already on a GPU
    are reduced there and read back at once, one wait for all of them: the values must exist before they can be
    checked, so such a call waits for whatever computed them.
    """
    device_checks = []
    for spec in specs:
        limit = spec.get("limit")
        value = tensors.get(spec["name"])
        if limit is None or value is None or value.numel() == 0:
            continue
        if value.device.type == "cpu":
            low, high = (int(v) for v in torch.aminmax(value))
            _check_range(spec["name"], low, high, limit)
        else:
            device_checks.append((spec["name"], limit, torch.stack(torch.aminmax(value))))
    for device in {b.device for _, _, b in device_checks}:
        here = [(name, limit, b) for name, limit, b in device_checks if b.device == device]
        bounds = torch.stack([b.to(torch.int64) for _, _, b in here]).tolist()  # the one wait (per GPU)
        for (name, limit, _), (low, high) in zip(here, bounds):
            _check_range(name, low, high, limit)


def _check_range(name: str, low: int, high: int, limit: int) -> None:
    if low < 0 or high >= limit:
        bad = low if low < 0 else high
        raise InputError(f"{name}: holds {bad}; its values index a table of {limit} rows and must lie in [0, {limit})")


def pick_bucket(batch: int, seq: int, buckets: list[tuple[int, int]], name: str) -> tuple[int, int]:
    """The covering bucket with the fewest tokens (ties: the shorter sequence)."""
    fits = [b for b in buckets if b[0] >= batch and b[1] >= seq]
    if not fits:
        raise InputError(f"{name}: shape ({batch}, {seq}) exceeds every bucket (buckets: {_buckets_text(buckets)})")
    return min(fits, key=lambda b: (b[0] * b[1], b[1]))


def pad_into(dst: torch.Tensor, src: torch.Tensor, *, is_mask: bool) -> None:
    """Copy src into the top-left of dst and fill the rest.

    Padded positions get 0 (a padded token id, a masked position, silent features). A padded batch row of the
    mask keeps its first position visible, so that no attention row is fully masked and nothing can turn into NaN.
    """
    if dst.shape == src.shape:  # an exact fit: one copy kernel instead of fill + copy
        dst.copy_(src)
        return
    dst.zero_()
    dst[tuple(slice(0, n) for n in src.shape)].copy_(src)
    if is_mask and dst.shape[0] > src.shape[0]:
        dst[src.shape[0] :, 0] = 1


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
