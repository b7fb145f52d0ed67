"""Tiny bundles written on CPU without compiling a model, and the edits an attacker makes to one."""

import hashlib
import json
import os
import stat
from pathlib import Path

import torch

from kernl.artifacts.manifest import FORMAT_VERSION, manifest_digest
from kernl.artifacts.weights import save_weights
from kernl.artifacts.writer import BundleWriter

PROGRAM = "program.json"


def random_weights() -> dict[str, torch.Tensor]:
    """Odd shapes and several dtypes, one tied pair, a scalar and an empty tensor."""
    shared = torch.randn(7, 5)
    return {
        "embed": shared,
        "head": shared,
        "w16": torch.randn(37, 3).to(torch.float16),
        "wbf": torch.randn(1023).to(torch.bfloat16),
        "ids": torch.randint(-(2**40), 2**40, (3, 2)),
        "mask": torch.rand(9) > 0.5,
        "scale": torch.tensor(torch.rand(()).item() + 0.5),
        "empty": torch.empty(0, 4),
    }


def write_bundle(
    path: Path, weights: dict[str, torch.Tensor] | None = None, sign=None, *, overwrite=False, archive=None
) -> Path:
    """A bundle with a program file, a kernels/ folder, a tokenizer file and weights; returns its folder.
    overwrite, archive: as BundleWriter's."""
    weights = random_weights() if weights is None else weights
    with BundleWriter(path, overwrite=overwrite, archive=archive) as writer:
        writer.write_text(PROGRAM, json.dumps({"nodes": [], "seed": torch.randint(0, 10**9, ()).item()}))
        writer.write_text("kernels/autotune.json", json.dumps({"linear": [torch.randint(0, 99, ()).item()]}))
        writer.write_text("tokenizer/tokenizer.json", "{}")
        aliases = save_weights(weights, writer.root / "weights.safetensors")
        manifest = minimal_manifest(sorted(weights))
        manifest["weights"]["aliases"] = aliases
        return writer.commit(manifest, sign=sign)


def minimal_manifest(weights: list[str] = ()) -> dict:
    """The entries every manifest needs (all but files and digest, which the writer adds): the bundle must hold
    program.json and weights.safetensors."""
    return {
        "format_version": FORMAT_VERSION,
        "versions": {},
        "target": {"device": "cpu"},
        "dtype": "float32",
        "inputs": [{"name": "input_ids", "dtype": "int64", "fill": "required", "rank": 2}],
        "outputs": [{"name": "hidden", "dims": ["batch", "seq", 5]}],
        "buckets": [[1, 8]],
        "program": {"file": PROGRAM, "weights": list(weights), "inputs": ["input_ids"]},
        "weights": {"file": "weights.safetensors", "aliases": {}},
    }


def entry(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def edit_manifest(root: Path, edit) -> dict:
    """Apply edit(manifest) and recompute the digest, as anyone can."""
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    manifest["digest"] = manifest_digest(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def reseal(root: Path) -> dict:
    """List every regular file on disk (links followed, as a careless tool would) with recomputed sizes and
    hashes, and recompute the digest: what an attacker does after planting or editing files."""

    def relist(manifest):
        files = {}
        for dirpath, _, names in os.walk(root, followlinks=True):
            for name in names:
                path = Path(dirpath) / name
                rel = path.relative_to(root).as_posix()
                if rel != "manifest.json" and stat.S_ISREG(path.stat().st_mode):
                    files[rel] = entry(path.read_bytes())
        manifest["files"] = files

    return edit_manifest(root, relist)


def write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
