"""The one-file form of a bundle: an uncompressed tar of its listed files, manifest.json first.

Unpacking trusts nothing in the archive. It refuses compressed archives, reads the manifest member first, and
accepts only the layout pack() writes: each listed regular file once, in sorted order, at its listed size (and
hash, with verify), nothing else, and no more bytes than the archive holds. The files go into a temporary
folder that is renamed into kernl's cache once complete. Processes that open one archive together check an
existing extraction under a shared lock and extract one at a time under an exclusive one, so they all share one
extraction. A cached extraction passes open_bundle's checks, and with verify every hash, before it is reused;
a damaged one is extracted again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import io
import os
import re
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from kernl.artifacts import publish
from kernl.artifacts.manifest import MANIFEST
from kernl.artifacts.reader import MAX_MANIFEST_BYTES, VerifiedBundle, open_folder, parse_manifest
from kernl.errors import BundleError

SUFFIX = ".kernl"
CHUNK = 1 << 22
# Leading bytes of the compressed formats people may hand us instead of a kernl archive.
_COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x04\x22\x4d\x18": "lz4",
    b"\x5d\x00\x00": "lzma",
    b"PK\x03\x04": "zip",
    b"7z\xbc\xaf\x27\x1c": "7z",
}
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)


def cache_root() -> Path:
    """Where archives are unpacked: bundles/ in kernl's per-machine cache ($KERNL_CACHE, else ~/.cache/kernl)."""
    return Path(os.environ.get("KERNL_CACHE") or Path.home() / ".cache" / "kernl") / "bundles"


def pack(bundle_dir: str | os.PathLike, archive: str | os.PathLike | None = None) -> Path:
    """Write the bundle folder as one archive file (atomically, readable by all) next to it, or at archive.

    Only what the manifest lists goes in, manifest.json first; a folder with unlisted files or links is refused.
    The archive is written under a hidden name, flock'ed while it is written (a compile that finds it unlocked
    removes it: see kernl.artifacts.writer), then renamed into place.
    """
    bundle_dir = Path(bundle_dir)
    archive = Path(archive) if archive is not None else bundle_dir.with_name(bundle_dir.name + SUFFIX)
    stem = archive.name.removesuffix(SUFFIX)
    tmp = archive.with_name(f".{stem}{publish.TMP_TAG}{uuid.uuid4().hex[:8]}{publish.STAGED_SUFFIX}")
    with publish.name_lock(archive.parent):  # created and locked at once: never seen unlocked
        held = write_archive(bundle_dir, tmp, keep_open=True)
    try:
        os.replace(tmp, archive)
    finally:
        os.close(held)
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return archive


def write_archive(bundle_dir: Path, dest: Path, *, keep_open: bool = False) -> int | None:
    """Write the archive of the bundle folder to the new file dest (mode 0644, flock'ed while written). With
    keep_open, returns the descriptor that holds its lock (the caller closes it); else None."""
    fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.fchmod(fd, 0o644)  # whatever the umask: a service running as another user reads it
        with open_folder(bundle_dir, verify=False) as bundle:
            out = os.fdopen(os.dup(fd), "wb")
            with out, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
                _add(tar, MANIFEST, io.BytesIO(bundle.manifest_bytes), len(bundle.manifest_bytes))
                for rel in bundle.names():
                    with bundle.open(rel) as f:
                        _add(tar, rel, f, bundle.entry(rel)["size"])
                tar.close()
                out.flush()
                os.fsync(out.fileno())
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(dest)
        raise
    if keep_open:
        return fd
    os.close(fd)
    return None


def manifest_of_archive(path: Path) -> bytes | None:
    """The manifest bytes of the kernl archive at path; None when it is not one (or cannot be read)."""
    try:
        with _Archive(path) as source:
            return source.manifest_bytes
    except (BundleError, OSError):
        return None


def _add(tar: tarfile.TarFile, name: str, f: BinaryIO, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0  # no owner, no time: the same bundle packs to the same bytes
    tar.addfile(info, f)


def unpack(archive: str | os.PathLike, cache_root: Path | None = None, *, verify: bool = True) -> Path:
    """The folder of the archive's checked extraction in kernl's cache (see open_archive)."""
    with open_archive(archive, verify=verify, cache=cache_root) as bundle:
        return bundle.root


def open_archive(archive: str | os.PathLike, *, verify: bool = True, cache: Path | None = None) -> VerifiedBundle:
    """open_bundle for a .kernl archive: its extraction in the cache folder (default cache_root()) named by the
    sha256 of its manifest, which pins every file's sha256. Extracted once; reused after checks.

    Many processes may open one archive at once (the workers of a server starting together): they check an
    existing extraction side by side, under a shared lock on the cache folder; one at a time, under an exclusive
    lock, replaces a missing or damaged one, and removes what killed extractions left there.
    """
    archive = Path(archive)
    root = Path(cache) if cache is not None else cache_root()
    try:
        with _Archive(archive) as source:
            target = root / f"{_stem(archive)}-{hashlib.sha256(source.manifest_bytes).hexdigest()[:32]}"
            root.mkdir(parents=True, exist_ok=True)
            with _locked(root, exclusive=False):
                bundle = _reuse(target, source.manifest_bytes, verify=verify, check_hashes=True)
            if bundle is None:
                with _locked(root, exclusive=True):
                    # Another process may have extracted it while this one waited for the lock.
                    bundle = _reuse(target, source.manifest_bytes, verify=verify, check_hashes=True)
                    if bundle is None:
                        bundle = _extract(source, root, target, verify=verify)
    except OSError as err:
        raise BundleError(f"{archive}: cannot be unpacked into {root} ({err.strerror or err})") from None
    bundle.archive = archive
    return bundle


def _extract(source: _Archive, root: Path, target: Path, *, verify: bool) -> VerifiedBundle:
    """Replace target with a fresh extraction (under the cache's exclusive lock); returns it, opened."""
    _remove_leftovers(root, target.name)
    _discard(target)
    tmp = source.extract(root, target.name, verify=verify)
    os.rename(tmp, target)
    # Just written from the archive and hashed as it was: read() and load_weights hash again as they read.
    bundle = _reuse(target, source.manifest_bytes, verify=verify, check_hashes=False)
    if bundle is None:
        raise BundleError(f"{source.path}: its extraction in {root} fails its checks")
    return bundle


@contextlib.contextmanager
def _locked(folder: Path, *, exclusive: bool) -> Iterator[None]:
    """flock on the cache folder: released by the kernel when a process dies, so a killed one never blocks the
    rest. Where the file system has no locks, extraction still renames a complete folder into place."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_leftovers(root: Path, name: str) -> None:
    """Partial and stale copies of the extraction called name: under the exclusive lock, none is in use."""
    for entry in root.glob(f".{glob.escape(name)}.*"):
        if entry.name.endswith(".partial") or ".stale-" in entry.name:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _stem(archive: Path) -> str:
    name = archive.name.removesuffix(SUFFIX)
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64].lstrip(".") or "bundle"


def _reuse(target: Path, manifest_bytes: bytes, *, verify: bool, check_hashes: bool) -> VerifiedBundle | None:
    """The extraction at target when it passes open_bundle's checks and holds this archive's manifest; None if
    it is absent or damaged."""
    try:
        bundle = open_folder(target, verify=verify, follow=False)  # a link planted in the cache is not followed
    except BundleError:
        return None
    try:
        if bundle.manifest_bytes != manifest_bytes:
            raise BundleError("another manifest")
        if check_hashes:
            bundle.check_all()
    except BundleError:
        bundle.close()
        return None
    return bundle


def _discard(target: Path) -> None:
    """Move a damaged extraction out of the way (atomically, so no one opens half of it), then delete it."""
    trash = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(target, trash)
    except FileNotFoundError:
        return
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


class _Archive:
    """An open archive whose manifest member (the first) has been read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 - closed by __exit__
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            magic = self._file.read(8)
            for signature, kind in _COMPRESSED.items():
                if magic.startswith(signature):
                    raise BundleError(f"{path}: {kind}-compressed; a kernl archive is an uncompressed tar")
            self._file.seek(0)
            self._tar = tarfile.open(fileobj=self._file, mode="r:")
            self.manifest_bytes = self._read_manifest()
        except (tarfile.TarError, EOFError, ValueError) as err:
            self._file.close()
            raise BundleError(f"{path}: not a readable kernl archive ({err})") from None
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def _read_manifest(self) -> bytes:
        member = self._tar.next()
        if member is None or member.name != MANIFEST or not _regular(member):
            raise BundleError(f"{self.path}: not a kernl archive ({MANIFEST} is not its first member)")
        if member.size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{self.path}: its {MANIFEST} is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
        raw = self._tar.extractfile(member).read()
        if len(raw) != member.size:
            raise BundleError(f"{self.path}: truncated")
        return raw

    def extract(self, root: Path, name: str, *, verify: bool) -> Path:
        """The listed files into a new temporary folder under root; returns it. Anything else in the archive
        (a member not listed, a link, a device, a sparse file, a second copy) refuses the whole archive."""
        where = f"{self.path}:{MANIFEST}"
        files = parse_manifest(self.manifest_bytes, where, verify=verify)["files"]
        if sum(entry["size"] for entry in files.values()) > self.size:
            raise BundleError(f"{where}: lists more bytes than the archive holds")
        # The one layout pack() writes: after the manifest, each listed file once, in sorted order, and nothing
        # else; so an archive has exactly one member more than its manifest lists files.
        order = sorted(files)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=root))
        try:
            written = 0
            while (member := self._tar.next()) is not None:
                entry = files.get(member.name)
                if not _regular(member):
                    raise BundleError(f"{self.path}: member {member.name!r} is not a regular file")
                if entry is None:
                    raise BundleError(f"{self.path}: member {member.name!r} is not listed in its manifest")
                if written == len(order) or order[written] != member.name:
                    why = "appears twice" if member.name in order[:written] else "is out of place (sorted order)"
                    raise BundleError(f"{self.path}: member {member.name!r} {why}")
                if member.size != entry["size"]:
                    raise BundleError(f"{self.path}: member {member.name!r} is not its listed size")
                self._write(member, tmp, entry["sha256"] if verify else None)
                written += 1
            if written < len(order):
                raise BundleError(f"{self.path}: {order[written]} is listed in its manifest but not in the archive")
            (tmp / MANIFEST).write_bytes(self.manifest_bytes)
            for folder, _, names in os.walk(tmp):
                os.chmod(folder, 0o755)  # mkdtemp makes it 0700
                for n in names:
                    os.chmod(os.path.join(folder, n), 0o644)
        except (tarfile.TarError, EOFError, ValueError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BundleError(f"{self.path}: not a readable kernl archive ({err})") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def _write(self, member: tarfile.TarInfo, tmp: Path, sha256: str | None) -> None:
        # Member names passed the manifest's path checks (relative, no '..'), and tmp is our own new folder.
        dest = tmp.joinpath(*member.name.split("/"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        digest = hashlib.sha256()
        source = self._tar.extractfile(member)
        with os.fdopen(fd, "wb") as out:
            left = member.size
            while left:
                block = source.read(min(CHUNK, left))
                if not block:
                    raise BundleError(f"{self.path}: truncated in member {member.name!r}")
                if sha256 is not None:
                    digest.update(block)
                out.write(block)
                left -= len(block)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise BundleError(f"{self.path}: member {member.name!r}: sha256 does not match its manifest")


def _regular(member: tarfile.TarInfo) -> bool:
    return member.type in _FILE_TYPES and not member.issparse()
