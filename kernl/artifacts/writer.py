"""Write a bundle atomically: everything goes to a hidden sibling folder, renamed into place at the end."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from kernl.artifacts.hashing import sha256_file
from kernl.artifacts.manifest import MANIFEST, manifest_digest
from kernl.errors import KernlError


class BundleWriter:
    """with BundleWriter(out, overwrite=...) as w: write files under w.root, then w.commit(manifest).

    Until commit, nothing exists at `out`; an exception (or Ctrl-C) removes the partial folder.
    """

    def __init__(self, output_dir: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.output = Path(output_dir).resolve()
        if self.output.exists() and not overwrite:
            raise KernlError(f"{self.output} already exists; pass overwrite=True (or --force) to replace it")
        if self.output.exists() and not self.output.is_dir():
            raise KernlError(f"{self.output} exists and is not a directory")
        self.root = self.output.parent / f".{self.output.name}.kernl-tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> BundleWriter:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.root.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)

    def write_text(self, name: str, text: str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def write_manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Hash every file and write manifest.json (last), inside the hidden folder; returns what was written."""
        files = {}
        for path in sorted(p for p in self.root.rglob("*") if p.is_file() and p.name != MANIFEST):
            rel = path.relative_to(self.root).as_posix()
            files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        manifest = {**manifest, "files": files}
        manifest["digest"] = manifest_digest(manifest)
        tmp = self.root / (MANIFEST + ".partial")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / MANIFEST)
        return manifest

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Write the manifest and move the folder into place."""
        self.write_manifest(manifest)
        old = None
        if self.output.exists():
            old = self.output.parent / f".{self.output.name}.kernl-old-{uuid.uuid4().hex[:8]}"
            os.replace(self.output, old)
        os.replace(self.root, self.output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.output
