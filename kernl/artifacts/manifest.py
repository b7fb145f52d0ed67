"""manifest.json: what a bundle holds, what built it, and what it was built for."""

from __future__ import annotations

import hashlib
import json
import platform
import re
from typing import Any

import torch

from kernl.errors import BundleError

FORMAT_VERSION = 2  # 2: the program is data (program.json); 1 ran program.py, which no kernl loads now
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("format_version", "versions", "target", "dtype", "inputs", "outputs", "buckets", "program", "files")
# Keys outside the digest: the digest itself, and the signature that signs it.
UNDIGESTED_KEYS = ("digest", "signature")
MAX_FILES = 100_000
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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
    """sha256 of the manifest's canonical JSON without its digest and signature: an edit anywhere else changes it."""
    body = {k: v for k, v in manifest.items() if k not in UNDIGESTED_KEYS}
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
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{MANIFEST}: 'files' must list the bundle's files")
    if len(files) > MAX_FILES:
        raise BundleError(f"{MANIFEST}: lists {len(files)} files, more than a bundle holds ({MAX_FILES})")
    for rel, entry in files.items():
        check_path(rel)
        size = entry.get("size") if isinstance(entry, dict) else None
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        if type(size) is not int or size < 0 or not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise BundleError(f"{MANIFEST}: the entry of {rel!r} needs a size in bytes and a sha256 in hex")
    return manifest


def check_path(rel: Any) -> str:
    """A listed path must name a file inside the bundle: relative, '/'-separated, no '.', '..' or empty parts,
    no backslash (a separator elsewhere) and no control characters; manifest.json itself is never listed."""
    ok = (
        isinstance(rel, str)
        and 0 < len(rel) <= 1024
        and not rel.startswith("/")
        and "\\" not in rel
        and not _CONTROL.search(rel)
        and all(part not in ("", ".", "..") for part in rel.split("/"))
        and rel != MANIFEST
    )
    if not ok:
        raise BundleError(f"{MANIFEST}: listed path {rel!r} does not name a file inside the bundle")
    return rel
