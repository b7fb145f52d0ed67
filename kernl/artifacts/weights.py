"""weights.safetensors: program inputs by name, with tied (shared) tensors stored once."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _view_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def save_weights(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, str]:
    """Write tensors; returns aliases (name -> stored name) for tensors that are the same view of one storage."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in tensors.items():
        key = _view_key(t)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        # safetensors refuses shared storage; a contiguous clone of any other partial view is its own tensor.
        stored[name] = t.detach().to("cpu").contiguous().clone()
    save_file(stored, str(path))
    return aliases


def load_weights(path: Path, aliases: dict[str, str], device: torch.device) -> dict[str, torch.Tensor]:
    """Read tensors straight onto device and re-tie the aliases."""
    tensors = load_file(str(path), device=str(device))
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors
