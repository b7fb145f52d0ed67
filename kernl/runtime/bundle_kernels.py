"""A bundle's kernels on this machine: checked against it, installed, and the scope its program runs in."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from kernl.kernels.session import KernelSession, install_kernels
from kernl.kernels.triton_cache import KERNELS_DIR, check_names
from kernl.runtime.compat import check_kernels


class BundleFiles(Protocol):
    """What is read from a verified bundle: its manifest, its listed names, and each file's verified bytes."""

    manifest: dict[str, Any]

    def names(self, prefix: str = "") -> list[str]: ...

    def read(self, rel: str) -> bytes: ...


def bundle_scope(files: BundleFiles, device: torch.device, *, recompile: bool) -> KernelSession | None:
    """Install the bundle's kernels for device; returns the scope its program must run in, or None.

    The scope is a KernelSession: calling it gives the context (the bundle's autotune decisions, frozen)
    to run the program in. Any file in kernels/ other than a kernel's cubin, its metadata and autotune.json
    is a BundleError, on every device. None on CPU, and when the kernels were built for another GPU or
    Triton and recompile=True lets them compile (and tune) here, as without a bundle; else BundleError.
    """
    names = files.names(KERNELS_DIR)
    check_names(names)  # a planted .so or .py is refused even where nothing of kernels/ is used
    if device.type != "cuda":
        return None
    if not check_kernels(files.manifest, device, recompile=recompile):
        return None
    members = {rel: files.read(rel) for rel in names}
    return install_kernels(members, device)
