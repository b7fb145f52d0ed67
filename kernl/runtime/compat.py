"""Can this machine run a bundle as built? A clear BundleError when not, or a warning with recompile."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from kernl.artifacts.manifest import library_versions
from kernl.errors import BundleError


def resolve_device(manifest: dict[str, Any], device: str | torch.device | None) -> torch.device:
    """The device to load onto: the caller's, else the bundle's target kind when this machine has it."""
    target = manifest["target"]
    if device is None:
        device = "cuda" if target["device"] == "cuda" and torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BundleError("device cuda: no CUDA GPU is available on this machine")
    return device


def kernel_mismatches(manifest: dict[str, Any], device: torch.device) -> list[str]:
    """Why the bundle's compiled kernels cannot serve this machine (empty when they can)."""
    target = manifest["target"]
    if device.type != "cuda" or target["device"] != "cuda":
        return []
    problems = []
    capability = "{}.{}".format(*torch.cuda.get_device_capability(device))
    if capability != target.get("capability"):
        problems.append(
            f"built for compute capability {target.get('capability')} ({target.get('gpu')}), "
            f"this GPU is {capability} ({torch.cuda.get_device_name(device)})"
        )
    here, built = library_versions(), manifest["versions"]
    for lib in ("triton", "torch"):
        if here.get(lib) != built.get(lib):
            problems.append(f"built with {lib} {built.get(lib)}, this machine has {here.get(lib)}")
    return problems


def check_kernels(manifest: dict[str, Any], device: torch.device, *, recompile: bool) -> bool:
    """True when the bundle's kernels can be used as they are; raises unless recompile allows a JIT rebuild."""
    problems = kernel_mismatches(manifest, device)
    if not problems:
        return True
    if not recompile:
        raise BundleError(f"manifest.json: {'; '.join(problems)} (load with recompile=True to rebuild the kernels)")
    warnings.warn(f"kernl: {'; '.join(problems)}; recompiling the kernels on this machine", stacklevel=3)
    return False
