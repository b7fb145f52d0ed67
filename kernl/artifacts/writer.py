"""Write a bundle atomically: everything goes to a hidden sibling folder, put in place in one step at the end.

Publishing (see kernl.artifacts.publish) exchanges the new folder with the old one, so the output is always
the old bundle or the new one, never neither nor a mix. The one-file archive, when asked for, is packed from the
hidden folder before anything is published and renamed into place right after the folder; a compile killed
between the two leaves its staged archive, which the next compile at that output moves into place (it matches
the published folder's manifest) or removes. Whatever else a killed compile left is removed by the next one.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kernl.artifacts import publish
from kernl.artifacts.hashing import file_entry
from kernl.artifacts.manifest import MANIFEST, UNDIGESTED_KEYS, manifest_digest
from kernl.errors import KernlError

ARCHIVE_SUFFIX = ".kernl"


class BundleWriter:
    """with BundleWriter(out, overwrite=..., archive=...) as w: write files under w.root, then w.commit(manifest).

    Until commit, nothing exists at `out`; an exception (or Ctrl-C) removes the partial folder, and a kill leaves
    hidden files that the next writer of `out` removes. archive: True also publishes `out.kernl` with the folder;
    False removes an `out.kernl` of an earlier bundle (with overwrite), so that the two never disagree; None
    leaves any archive alone.
    """

    def __init__(self, output_dir: str | os.PathLike, *, overwrite: bool = False, archive: bool | None = None) -> None:
        self.output = Path(output_dir).resolve()
        self.overwrite = overwrite
        self.archive = archive
        self.packed = self.output.with_name(self.output.name + ARCHIVE_SUFFIX)
        self._check_target()
        self.root = self.output.parent / f".{self.output.name}{publish.TMP_TAG}{uuid.uuid4().hex[:8]}"
        self._held: int | None = None

    def _check_target(self) -> None:
        if os.path.lexists(self.output):
            if not self.overwrite:
                raise KernlError(f"{self.output} already exists; pass overwrite=True (or --force) to replace it")
            if self.output.is_symlink() or not self.output.is_dir():
                raise KernlError(f"{self.output} exists and is not a directory")
        if self.archive is not None and os.path.lexists(self.packed):
            if not self.overwrite:
                raise KernlError(f"{self.packed} already exists; pass overwrite=True (or --force) to replace it")
            if self.packed.is_symlink() or not self.packed.is_file():
                raise KernlError(f"{self.packed} exists and is not an archive file")

    def __enter__(self) -> BundleWriter:
        try:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            with publish.name_lock(self.output.parent):
                garbage = self._clear_leftovers()
                self.root.mkdir()
                self._held = publish.hold(self.root)  # alive: the next writer leaves this folder alone
        except OSError as err:
            self._release()
            raise KernlError(f"{self.output}: cannot be written ({err.strerror or err})") from None
        for path in garbage:
            publish.remove(path)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._release()

    def _release(self) -> None:
        for path in (self.root, self._staged, self._removed):
            publish.remove(path)
        if self._held is not None:
            os.close(self._held)
            self._held = None

    @property
    def _staged(self) -> Path:
        return self.root.with_name(self.root.name + publish.STAGED_SUFFIX)

    @property
    def _removed(self) -> Path:
        return self.root.with_name(self.root.name + publish.REMOVED_SUFFIX)

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
                files[rel] = file_entry(path)
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
        """Write the manifest (signed by sign, when given), pack the archive when asked, and publish both."""
        try:
            self.write_manifest(manifest, sign=sign)
            if self.archive:
                from kernl.artifacts.archive import write_archive

                write_archive(self.root, self._staged)
            with publish.name_lock(self.output.parent):
                garbage = self._clear_leftovers()
                self._check_target()  # again: another compile may have published meanwhile
                self._publish()
        except OSError as err:
            raise KernlError(f"{self.output}: cannot be written ({err.strerror or err})") from None
        for path in garbage:
            publish.remove(path)
        self._release()  # the hidden folder now holds the old bundle, if there was one
        return self.output

    def _publish(self) -> None:
        """Under the name lock: the folder in one step, then the archive (or away with a stale one)."""
        if self.archive is False and os.path.lexists(self.packed):
            os.rename(self.packed, self._removed)  # a killed publish puts it back (the folder was not swapped)
        if not os.path.lexists(self.output):
            os.rename(self.root, self.output)
        elif not publish.exchange(self.root, self.output):
            # No exchange on this file system: two renames. A kill between them leaves the old folder aside,
            # which the next writer puts back.
            old = self.root.with_name(self.root.name + publish.OLD_SUFFIX)
            os.rename(self.output, old)
            os.rename(self.root, self.output)
            os.rename(old, self.root)
        if self.archive:
            os.replace(self._staged, self.packed)

    def _clear_leftovers(self) -> list[Path]:
        """Under the name lock: finish or undo what killed writers of this output left; returns the dead files
        and folders to delete (once the lock is released)."""
        prefix = f".{self.output.name}{publish.TMP_TAG}"
        garbage = []
        for path in sorted(self.output.parent.glob(f".{glob.escape(self.output.name)}.kernl-old-*")):
            # What an earlier kernl left when killed while it replaced a bundle in two renames.
            if os.path.lexists(self.output):
                garbage.append(path)
            else:
                os.rename(path, self.output)
        # Sorted, a writer's folder comes first, then its "-old" folder, staged archive and removed archive.
        for path in sorted(p for p in self.output.parent.iterdir() if p.name.startswith(prefix)):
            writer = path.with_name(path.name[: len(prefix) + 8])
            if not (publish.is_dead(writer) and publish.is_dead(path)):
                continue  # a live writer's
            published = _manifest_of_folder(self.output)
            if path.name.endswith(publish.OLD_SUFFIX) and not os.path.lexists(self.output):
                os.rename(path, self.output)  # killed between the two renames: the old bundle goes back
            elif (
                path.name.endswith(publish.STAGED_SUFFIX)
                and _holds(path, published)
                and not _holds(self.packed, published)
            ):
                os.replace(path, self.packed)  # killed after the folder went in: its archive follows it
            elif path.name.endswith(publish.REMOVED_SUFFIX) and _holds(path, published):
                if not os.path.lexists(self.packed):
                    os.rename(path, self.packed)  # killed before the folder went in: the old archive stays
            else:
                garbage.append(path)
        return garbage


def _manifest_of_folder(folder: Path) -> bytes | None:
    with contextlib.suppress(OSError):
        return (folder / MANIFEST).read_bytes()
    return None


def _holds(archive: Path, manifest: bytes | None) -> bool:
    """Whether the archive at that path holds this manifest (the same bundle as the folder it came with)."""
    from kernl.artifacts.archive import manifest_of_archive

    return manifest is not None and os.path.lexists(archive) and manifest_of_archive(archive) == manifest
