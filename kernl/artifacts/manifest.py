"""manifest.json: what a bundle holds, what built it, and what it was built for."""

from __future__ import annotations

import hashlib
import json
import platform
from typing import Any

import torch

from kernl.errors import BundleError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("format_version", "versions", "target", "dtype", "inputs", "outputs", "buckets", "program", "files")


def library_versions() -> dict[str, str | None]:
    """Versions of what built (or loads) a bundle; transformers is read without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "kernl": pkg("kernl") or "0+local",
        "torch": torch.__version__,
        "triton": pkg("triton"),
        "transformers": pkg("transformers"),
        "python": platform.python_version(),
    }


def describe_target(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"device": "cuda", "gpu": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}"}
    return {"device": device.type}


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own digest: an edit anywhere changes it."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def validate(manifest: Any) -> dict[str, Any]:
    """Check the manifest's shape and format version; raise BundleError naming what is wrong."""
    if not isinstance(manifest, dict):
        raise BundleError(f"{MANIFEST}: expected a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{MANIFEST}: format version {version!r} is not supported (this kernl reads {FORMAT_VERSION})"
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{MANIFEST}: missing keys {', '.join(missing)}")
    if not isinstance(manifest["files"], dict) or not manifest["files"]:
        raise BundleError(f"{MANIFEST}: 'files' must list the bundle's files")
    return manifest
