"""Read and verify a bundle's manifest and files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kernl.artifacts.hashing import sha256_file
from kernl.artifacts.manifest import MANIFEST, manifest_digest, validate
from kernl.errors import BundleError


def read_manifest(bundle_dir: str | os.PathLike, *, verify: bool = True, hash_files: bool = True) -> dict[str, Any]:
    """The validated manifest, every listed file present at its size; with verify, the manifest's digest and
    (unless hash_files is False, for a caller that runs verify_hashes itself) every file's sha256 too."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle directory")
    path = root / MANIFEST
    try:
        manifest = validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing; not a complete kernl bundle") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from None
    if verify and manifest.get("digest") != manifest_digest(manifest):
        raise BundleError(f"{path}: edited after the bundle was written (its digest does not match)")
    for rel, entry in manifest["files"].items():
        file = root / rel
        if not file.is_file():
            raise BundleError(f"{file}: listed in the manifest but missing")
        if file.stat().st_size != entry.get("size"):
            raise BundleError(f"{file}: size {file.stat().st_size} bytes, the manifest says {entry.get('size')}")
    if verify and hash_files:
        verify_hashes(root, manifest, manifest["files"])
    return manifest


def verify_hashes(root: Path, manifest: dict[str, Any], files: Iterable[str]) -> None:
    """Check the sha256 of the listed files (paths relative to root, as the manifest names them)."""
    for rel in files:
        file = root / rel
        if rel not in manifest["files"]:
            raise BundleError(f"{file}: not listed in the manifest, so it cannot be verified")
        if sha256_file(file) != manifest["files"][rel].get("sha256"):
            raise BundleError(f"{file}: sha256 does not match the manifest (corrupt or edited)")
