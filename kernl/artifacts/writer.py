"""Write a bundle atomically: everything goes to a hidden sibling folder, renamed into place at the end."""

from __future__ import annotations

import json
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kernl.artifacts.hashing import sha256_file
from kernl.artifacts.manifest import MANIFEST, UNDIGESTED_KEYS, manifest_digest
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

    def write_manifest(
        self, manifest: dict[str, Any], *, sign: Callable[[str], dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """List and hash every file, and write manifest.json (last) inside the hidden folder; returns what was
        written. sign, when given, is called with the digest; its result is stored as manifest["signature"]."""
        files = {}
        for path in self._files():
            rel = path.relative_to(self.root).as_posix()
            if rel != MANIFEST:
                files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        manifest = {k: v for k, v in manifest.items() if k not in UNDIGESTED_KEYS}
        manifest["files"] = files
        manifest["digest"] = manifest_digest(manifest)
        if sign is not None:
            manifest["signature"] = sign(manifest["digest"])
        tmp = self.root / (MANIFEST + ".partial")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.root / MANIFEST)
        return manifest

    def _files(self) -> list[Path]:
        """Every file under the folder, sorted, made readable by all (0644, folders 0755: mkstemp and some
        writers create files 0600); a link or anything but a regular file is a KernlError."""
        found = []
        os.chmod(self.root, 0o755)
        for folder, dirs, names in os.walk(self.root):
            for name in sorted(dirs + names):
                path = Path(folder) / name
                mode = path.lstat().st_mode
                if stat.S_ISDIR(mode):
                    os.chmod(path, 0o755)
                elif stat.S_ISREG(mode):
                    os.chmod(path, 0o644)
                    found.append(path)
                else:
                    raise KernlError(f"{path}: a bundle holds regular files and folders only (no links)")
        return sorted(found)

    def commit(self, manifest: dict[str, Any], *, sign: Callable[[str], dict[str, Any]] | None = None) -> Path:
        """Write the manifest (signed by sign, when given) and move the folder into place."""
        self.write_manifest(manifest, sign=sign)
        old = None
        if self.output.exists():
            old = self.output.parent / f".{self.output.name}.kernl-old-{uuid.uuid4().hex[:8]}"
            os.replace(self.output, old)
        os.replace(self.root, self.output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.output
