"""manifest.json: what a bundle holds, what built it, and what it was built for."""

from __future__ import annotations

import hashlib
import json
import platform
from typing import Any

import torch

from kernl.artifacts.schema import MAX_FILES, Invalid, check_manifest
from kernl.artifacts.schema import check_path as _check_path
from kernl.errors import BundleError

FORMAT_VERSION = 2  # 2: the program is data (program.json); 1 ran program.py, which no kernl loads now
MANIFEST = "manifest.json"
# Keys outside the digest: the digest itself, and the signature that signs it.
UNDIGESTED_KEYS = ("digest", "signature")
__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "MAX_FILES",
    "UNDIGESTED_KEYS",
    "check_path",
    "describe_target",
    "library_versions",
    "manifest_digest",
    "validate",
]


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
    """Check the manifest against its schema (kernl.artifacts.schema) and the relations between its entries;
    raise BundleError naming what is wrong."""
    if not isinstance(manifest, dict):
        raise BundleError(f"{MANIFEST}: expected a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{MANIFEST}: format version {version!r} is not supported (this kernl reads {FORMAT_VERSION})"
        )
    check_manifest(manifest)
    _check_relations(manifest)
    return manifest


def _check_relations(manifest: dict[str, Any]) -> None:
    """What the schema cannot say: names are unique, the program's inputs have specs, named files are listed."""
    files, program = manifest["files"], manifest["program"]
    for key in ("inputs", "outputs"):
        names = [spec["name"] for spec in manifest[key]]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise BundleError(f"{MANIFEST}: {key}: {twice[0]!r} appears twice")
    specs = {spec["name"] for spec in manifest["inputs"]}
    missing = [name for name in program["inputs"] if name not in specs]
    if missing:
        raise BundleError(f"{MANIFEST}: program input {missing[0]!r} has no entry in inputs")
    named = [("program.file", program["file"]), ("program.view", program.get("view"))]
    weights = manifest.get("weights")
    if isinstance(weights, dict):
        named.append(("weights.file", weights["file"]))
        named += [(f"weights.ranks[{r}]", rel) for r, rel in enumerate(weights.get("ranks") or [])]
    ranks, tp = (weights or {}).get("ranks"), manifest.get("tensor_parallel")
    if (tp is None) != (ranks is None) or (tp is not None and len(ranks) != tp["world_size"]):
        raise BundleError(f"{MANIFEST}: tensor_parallel and weights.ranks come together, one weights file per rank")
    autotune = (manifest.get("kernels") or {}).get("autotune")
    named.append(("kernels.autotune", autotune))
    for key, rel in named:
        if rel is not None and rel not in files:
            raise BundleError(f"{MANIFEST}: {key} names {rel!r}, which is not listed in its files")
    buckets = [tuple(b) for b in manifest["buckets"]]
    if len(set(buckets)) != len(buckets):
        raise BundleError(f"{MANIFEST}: buckets: a bucket appears twice")


def check_path(rel: Any) -> str:
    """A listed path must name a file inside the bundle (see kernl.artifacts.schema.check_path)."""
    try:
        return _check_path(rel)
    except Invalid as err:
        raise BundleError(f"{MANIFEST}: {err.problem}") from None
