"""Can this machine run a bundle as built? A clear BundleError when not."""

from __future__ import annotations

from typing import Any

import torch

from kernl.errors import BundleError


def resolve_device(manifest: dict[str, Any], device: str | torch.device | None) -> torch.device:
    """The device to load onto: the caller's, else the bundle's target kind when this machine has it."""
    target = manifest["target"]
    if device is None:
        device = "cuda" if target["device"] == "cuda" and torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BundleError("device cuda: no CUDA GPU is available on this machine")
        if target["device"] == "cuda":
            capability = "{}.{}".format(*torch.cuda.get_device_capability(device))
            if capability != target.get("capability"):
                raise BundleError(
                    f"manifest.json: built for compute capability {target.get('capability')} "
                    f"({target.get('gpu')}), this GPU is {capability} ({torch.cuda.get_device_name(device)})"
                )
    return device
