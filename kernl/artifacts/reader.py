"""Open a bundle and read its files as they were verified.

A bundle is data, like a safetensors file. Opening one checks that every file on disk is listed in the manifest
(at its listed size), that nothing is a link and that no listed path leaves the folder. Each file is then read
once, hashed, and served from memory: a file swapped on disk after the check changes nothing that was read.
Files are opened beneath the bundle's folder one path component at a time, never following a link.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import threading
import weakref
from pathlib import Path
from typing import Any, BinaryIO

from kernl.artifacts.hashing import CHUNK, stream_checker
from kernl.artifacts.manifest import MANIFEST, manifest_digest, validate
from kernl.errors import BundleError

MAX_MANIFEST_BYTES = 64 << 20
MAX_DEPTH = 32
MAX_OPEN_DIRS = 64  # folder descriptors a bundle keeps open for its reads
# check_all() keeps files up to this size in memory, so that read() serves them without reading them again.
KEEP_BYTES = 16 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted under a listed name must not hang; regular files ignore it.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _os_error(path: Path, err: OSError) -> BundleError:
    if err.errno == errno.ELOOP:
        return BundleError(f"{path}: a symbolic link on its path; a bundle holds regular files and folders only")
    if err.errno == errno.ENOENT:
        return BundleError(f"{path}: listed in the manifest but missing")
    return BundleError(f"{path}: cannot be read ({err.strerror or err})")


class VerifiedBundle:
    """A bundle folder whose manifest was validated and whose files were checked against it (see open_bundle).

    root: the folder (for an archive, its verified extraction); manifest: the parsed manifest.
    read(rel) gives a listed file's bytes, read once and hashed (when verify); names(prefix) lists files.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], manifest_bytes: bytes, root_fd: int, verify: bool):
        self.root = root
        self.manifest = manifest
        self.manifest_bytes = manifest_bytes
        self.verify = verify
        self.archive: Path | None = None  # the .kernl file this folder was extracted from, if any
        # Folder descriptors by relative path ("" is the root), opened once without following links: every
        # read resolves beneath them, and a folder swapped for a link later is never followed.
        self._dirs: dict[str, int] = {"": root_fd}
        self._cache: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._closer = weakref.finalize(self, _close_all, self._dirs)

    def __repr__(self) -> str:
        return f"VerifiedBundle({str(self.root)!r}, {len(self.manifest['files'])} files, verify={self.verify})"

    def __enter__(self) -> VerifiedBundle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the folder's descriptors and the bytes kept in memory; reads that follow fail."""
        with self._lock:
            self._closer()
            self._cache.clear()

    def names(self, prefix: str = "") -> list[str]:
        """Listed files under the folder prefix (e.g. "kernels/"; "" for all), sorted."""
        files = self.manifest["files"]
        if not prefix:
            return sorted(files)
        folder = prefix if prefix.endswith("/") else prefix + "/"
        return sorted(rel for rel in files if rel.startswith(folder))

    def entry(self, rel: str) -> dict[str, Any]:
        """The manifest's entry of a listed file: {"size": bytes, "sha256": hex}."""
        entry = self.manifest["files"].get(rel) if isinstance(rel, str) else None
        if entry is None:
            raise BundleError(f"{self._path(rel)}: not listed in the manifest, so it cannot be verified")
        return entry

    def read(self, rel: str) -> bytes:
        """The bytes of a listed file: read from disk once, checked against the manifest's sha256 (when the
        bundle verifies), then served from memory."""
        data = self._cache.get(rel)
        if data is not None:
            return data
        size = self.entry(rel)["size"]
        fd = self._open_checked(rel)
        try:
            chunks, got = [], 0
            while got <= size:  # one byte more than listed: a file that grew since it was opened is caught
                chunk = os.read(fd, size + 1 - got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        except OSError as err:
            raise _os_error(self._path(rel), err) from None
        finally:
            os.close(fd)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._check_read(rel, len(data))
        if self.verify and hashlib.sha256(data).hexdigest() != self.entry(rel)["sha256"]:
            raise self.mismatch(rel)
        with self._lock:
            return self._cache.setdefault(rel, data)

    def open(self, rel: str) -> BinaryIO:
        """A listed file opened for reading beneath the folder (no link followed at any level) and checked to be
        a regular file of its listed size. Unverified: the caller hashes what it reads (see load_weights)."""
        return os.fdopen(self._open_checked(rel), "rb")

    def mismatch(self, rel: str) -> BundleError:
        return BundleError(f"{self._path(rel)}: sha256 does not match the manifest (corrupt or edited)")

    def check_all(self, *, keep: bool = True) -> None:
        """Hash every listed file now (a no-op unless the bundle verifies). With keep, files up to KEEP_BYTES stay
        in memory for read(); larger ones are read again, and hashed again, by whoever uses them."""
        if not self.verify:
            return
        for rel in self.names():
            if keep and self.entry(rel)["size"] <= KEEP_BYTES:
                self.read(rel)
            else:
                self._hash_file(rel)

    def _hash_file(self, rel: str) -> None:
        checker = stream_checker(self.entry(rel), "kernl-hash")
        with self.open(rel) as f:
            try:
                while block := f.read(CHUNK):
                    checker.feed(block)
                size = f.tell()
            except OSError as err:
                raise _os_error(self._path(rel), err) from None
            finally:
                checker.finish()
        self._check_read(rel, size)
        if not checker.matches():
            raise self.mismatch(rel)

    def _path(self, rel: Any) -> str:
        """For messages only."""
        return f"{self.root}/{rel}"

    def _check_read(self, rel: str, size: int) -> None:
        if size != self.manifest["files"][rel]["size"]:
            raise BundleError(f"{self._path(rel)}: changed while it was read (not its listed size)")

    def _open_checked(self, rel: str) -> int:
        """A descriptor of the listed file, a regular file at its listed size."""
        size = self.entry(rel)["size"]
        folder, _, name = rel.rpartition("/")
        dir_fd, transient = self._dir(folder)
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        except OSError as err:
            raise _os_error(self._path(rel), err) from None
        finally:
            if transient:
                os.close(dir_fd)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise BundleError(f"{self._path(rel)}: not a regular file")
            if info.st_size != size:
                raise BundleError(f"{self._path(rel)}: size {info.st_size} bytes, the manifest says {size}")
        except BaseException as err:
            os.close(fd)
            if isinstance(err, OSError):
                raise _os_error(self._path(rel), err) from None
            raise
        return fd

    def _dir(self, folder: str) -> tuple[int, bool]:
        """A descriptor of a folder of the bundle, and whether the caller must close it (past MAX_OPEN_DIRS
        folders, descriptors are not kept)."""
        with self._lock:
            if not self._closer.alive:
                raise BundleError(f"{self.root}: the bundle was closed")
            fd = self._dirs.get(folder)
            if fd is not None:
                return fd, False
        parent, _, name = folder.rpartition("/")
        parent_fd, transient = self._dir(parent)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as err:
            raise _os_error(self._path(folder), err) from None
        finally:
            if transient:
                os.close(parent_fd)
        with self._lock:
            if self._closer.alive and folder not in self._dirs and len(self._dirs) < MAX_OPEN_DIRS:
                self._dirs[folder] = fd
                return fd, False
        return fd, True


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


def open_bundle(path: str | os.PathLike, *, verify: bool = True) -> VerifiedBundle:
    """Open a bundle folder or a .kernl archive (unpacked once into kernl's cache, see archive.open_archive).

    Checks, each a BundleError naming the file: the manifest is valid JSON of this format (and, with verify, its
    digest matches); every listed path stays inside the folder; every file on disk is listed, at its listed size;
    nothing is a symbolic link, a device or a FIFO. File hashes are checked as files are read (read(), and
    load_weights), or all at once by check_all().
    """
    source = Path(path)
    try:
        mode = os.stat(source).st_mode
    except FileNotFoundError:
        raise BundleError(f"{source}: no such bundle") from None
    except OSError as err:
        raise BundleError(f"{source}: cannot be read ({err.strerror or err})") from None
    if stat.S_ISREG(mode):
        from kernl.artifacts.archive import open_archive

        return open_archive(source, verify=verify)
    if not stat.S_ISDIR(mode):
        raise BundleError(f"{source}: neither a bundle folder nor a .kernl archive")
    return open_folder(source, verify=verify)


def open_folder(root: Path, *, verify: bool = True, follow: bool = True) -> VerifiedBundle:
    """open_bundle for a folder. follow: the folder named may itself be a link (a user's choice, say a release
    folder pointing at the current bundle); nothing under it may be."""
    try:
        fd = os.open(root, _DIR_FLAGS if not follow else _DIR_FLAGS & ~os.O_NOFOLLOW)
    except FileNotFoundError:
        raise BundleError(f"{root}: no such bundle") from None
    except OSError as err:
        raise BundleError(f"{root}: cannot be read ({err.strerror or err})") from None
    try:
        raw = _read_manifest_bytes(root, fd)
        manifest = parse_manifest(raw, root / MANIFEST, verify=verify)
        bundle = VerifiedBundle(root, manifest, raw, fd, verify)
    except BaseException:
        os.close(fd)
        raise
    seen: set[str] = set()
    try:
        _walk(bundle, "", 0, seen)
    except OSError as err:
        bundle.close()
        raise BundleError(f"{root}: cannot be read ({err.strerror or err})") from None
    except BaseException:
        bundle.close()
        raise
    missing = sorted(set(manifest["files"]) - seen)
    if missing:
        bundle.close()
        raise BundleError(f"{root / missing[0]}: listed in the manifest but missing")
    return bundle


def parse_manifest(raw: bytes, where: Path | str, *, verify: bool) -> dict[str, Any]:
    """The validated manifest from its bytes; with verify, its digest must match its content."""
    try:
        # UTF-8 only (json.loads would guess UTF-16 or 32 from bytes), and no NaN or Infinity: not JSON.
        manifest = validate(json.loads(raw.decode("utf-8"), parse_constant=_not_json))
    except (ValueError, RecursionError) as err:  # ValueError: bad JSON, bad UTF-8, an integer of 4300 digits
        raise BundleError(f"{where}: not valid JSON ({err})") from None
    except BundleError as err:
        raise BundleError(f"{where}: {str(err).removeprefix(MANIFEST + ': ')}") from None
    if verify and manifest.get("digest") != manifest_digest(manifest):
        raise BundleError(f"{where}: edited after the bundle was written (its digest does not match)")
    return manifest


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def _read_manifest_bytes(root: Path, root_fd: int) -> bytes:
    path = root / MANIFEST
    try:
        fd = os.open(MANIFEST, _FILE_FLAGS, dir_fd=root_fd)
    except FileNotFoundError:
        raise BundleError(f"{path}: missing; not a complete kernl bundle") from None
    except OSError as err:
        raise _os_error(path, err) from None
    with os.fdopen(fd, "rb") as f:
        try:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise BundleError(f"{path}: not a regular file")
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        except OSError as err:
            raise _os_error(path, err) from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB; not a kernl manifest")
    return raw


def _walk(bundle: VerifiedBundle, folder: str, depth: int, seen: set[str]) -> None:
    """Every entry under the folder: listed regular files at their size, folders; anything else is refused."""
    if depth > MAX_DEPTH:
        raise BundleError(f"{bundle._path(folder)}: folders nested deeper than {MAX_DEPTH}")
    files = bundle.manifest["files"]
    prefix = folder + "/" if folder else ""
    dir_fd, transient = bundle._dir(folder)
    try:  # the entries stat through dir_fd: it stays open until they are done
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                rel = prefix + entry.name
                if entry.is_symlink():
                    raise BundleError(f"{bundle._path(rel)}: a symbolic link; a bundle holds regular files and folders")
                if entry.is_dir(follow_symlinks=False):
                    _walk(bundle, rel, depth + 1, seen)
                elif entry.is_file(follow_symlinks=False):
                    if rel == MANIFEST:
                        continue
                    listed = files.get(rel)
                    if listed is None:
                        raise BundleError(f"{bundle._path(rel)}: not listed in the manifest")
                    size = entry.stat(follow_symlinks=False).st_size
                    if size != listed["size"]:
                        raise BundleError(f"{bundle._path(rel)}: size {size} bytes, the manifest says {listed['size']}")
                    seen.add(rel)
                else:
                    raise BundleError(f"{bundle._path(rel)}: not a regular file or folder")
    finally:
        if transient:
            os.close(dir_fd)


def read_manifest(path: str | os.PathLike, *, verify: bool = True, hash_files: bool = True) -> dict[str, Any]:
    """The manifest of the bundle (folder or archive) at path, after open_bundle's checks; with verify (and
    hash_files), every file's sha256 too. For commands that describe a bundle; loading uses open_bundle."""
    with open_bundle(path, verify=verify) as bundle:
        if hash_files:
            bundle.check_all(keep=False)
        return bundle.manifest
