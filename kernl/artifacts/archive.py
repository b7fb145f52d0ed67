"""The one-file form of a bundle: an uncompressed tar of its folder (weights do not compress)."""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from pathlib import Path

from kernl.errors import BundleError

SUFFIX = ".kernl"


def pack(bundle_dir: Path, archive: Path | None = None) -> Path:
    """Write bundle_dir as one archive file (atomically) next to it, or at archive."""
    archive = archive or bundle_dir.with_name(bundle_dir.name + SUFFIX)
    fd, tmp = tempfile.mkstemp(prefix=f".{archive.name}.", dir=archive.parent)
    os.close(fd)
    try:
        with tarfile.open(tmp, "w") as tar:
            for path in sorted(bundle_dir.rglob("*")):
                tar.add(path, arcname=path.relative_to(bundle_dir).as_posix(), recursive=False)
        os.replace(tmp, archive)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return archive


def unpack(archive: Path, cache_root: Path | None = None) -> Path:
    """Extract once into a cache folder named by the archive's hash; later loads reuse it."""
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    root = cache_root or Path(os.environ.get("KERNL_CACHE", Path.home() / ".cache" / "kernl"))
    target = root / f"{archive.stem}-{digest.hexdigest()[:16]}"
    if (target / "manifest.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        with tarfile.open(archive, "r") as tar:
            tar.extractall(tmp, filter="data")  # refuses absolute paths, links out and device files
        os.replace(tmp, target)
    except (tarfile.TarError, OSError) as err:
        raise BundleError(f"{archive}: not a readable kernl archive ({err})") from None
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return target
