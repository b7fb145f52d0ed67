"""A bundle's Triton kernels as files: what kernels/ may hold, and the per-machine cache Triton reads them from.

A bundle carries, per kernel, only what Triton needs for a cache hit: the device code (`<name>.cubin`) and the
launch metadata (`<name>.json`), in Triton's folder for that kernel's cache key:

    kernels/triton/<key>/<name>.cubin
    kernels/triton/<key>/<name>.json
    kernels/autotune.json

Triton's compile() finds a kernel through `__grp__<name>.json`, a list of the kernel's files by ABSOLUTE path
(Triton 3.6 and 3.9 alike); on a hit it reads that metadata and the cubin, nothing else (the .source/.ttir/
.ttgir/.llir/.ptx stages are only read again when compiling). So the group is machine-specific: the bundle
does not carry it, installing writes it. Host code (launcher and cuda_utils .so files, .c/.py sources) never
comes from a bundle: Triton builds it on this machine, in the same per-machine cache, the first time.
"""

from __future__ import annotations

import json
import keyword
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from kernl.errors import BundleError, KernlError

KERNELS_DIR = "kernels"
TRITON_DIR = "kernels/triton"
AUTOTUNE_FILE = "kernels/autotune.json"
BINARY_EXT = "cubin"
# <key>: Triton's cache key (base32 of a sha256); <name>: the kernel's function name (Triton cuts it at 150).
_MEMBER = re.compile(r"kernels/triton/([A-Za-z0-9]{16,128})/([A-Za-z_][A-Za-z0-9_]{0,149})\.(cubin|json)")
_GROUP_PREFIX = "__grp__"  # Triton's group files: written here, never taken from a bundle


class KernelFiles:
    """One kernel's files: its cache key, its name, its cubin and its metadata (bytes)."""

    __slots__ = ("key", "name", "cubin", "metadata")

    def __init__(self, key: str, name: str, cubin: bytes, metadata: bytes) -> None:
        self.key, self.name, self.cubin, self.metadata = key, name, cubin, metadata

    def files(self) -> dict[str, bytes]:
        """The bundle's members for this kernel, by path relative to the bundle."""
        folder = f"{TRITON_DIR}/{self.key}/{self.name}"
        return {f"{folder}.{BINARY_EXT}": self.cubin, f"{folder}.json": self.metadata}


def parse_members(files: Mapping[str, bytes]) -> tuple[list[KernelFiles], bytes | None]:
    """The kernels and the autotune file among a bundle's kernels/ members; BundleError for anything else.

    files: path relative to the bundle (as the manifest lists it) -> verified bytes.
    """
    parts: dict[tuple[str, str], dict[str, bytes]] = {}
    autotune = None
    for rel, data in files.items():
        if not isinstance(rel, str) or not isinstance(data, bytes | bytearray | memoryview):
            raise BundleError(f"{rel!r}: expected a path and its bytes")
        if rel == AUTOTUNE_FILE:
            autotune = bytes(data)
            continue
        key, name, ext = _member(rel)
        parts.setdefault((key, name), {})[ext] = bytes(data)
    kernels = []
    for (key, name), found in sorted(parts.items()):
        if set(found) != {BINARY_EXT, "json"}:
            missing = ({BINARY_EXT, "json"} - set(found)).pop()
            raise BundleError(f"{TRITON_DIR}/{key}/{name}.{missing}: missing (a kernel needs its cubin and metadata)")
        _check_metadata(f"{TRITON_DIR}/{key}/{name}.json", found["json"])
        kernels.append(KernelFiles(key, name, found[BINARY_EXT], found["json"]))
    if len({k.key for k in kernels}) != len(kernels):
        raise BundleError(f"{TRITON_DIR}/: two kernels under one cache key")
    return kernels, autotune


def check_names(rels: Iterable[str]) -> None:
    """BundleError for the first path that kernels/ may not hold (names only; see parse_members)."""
    for rel in rels:
        if rel != AUTOTUNE_FILE:
            _member(rel)


def _member(rel: str) -> tuple[str, str, str]:
    """(cache key, kernel name, extension) of a kernel file's path in the bundle, or BundleError."""
    match = _MEMBER.fullmatch(rel)
    if match is None or match[2].startswith(_GROUP_PREFIX):
        raise BundleError(
            f"{rel}: not allowed in {KERNELS_DIR}/ (a bundle's kernels are device code "
            f"{TRITON_DIR}/<key>/<name>.{BINARY_EXT}, its metadata <name>.json, and {AUTOTUNE_FILE})"
        )
    return match[1], match[2], match[3]


def _check_metadata(rel: str, data: bytes) -> None:
    """Triton turns the metadata into a namedtuple and a launcher: it must be a plain JSON object of such fields."""
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{rel}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        raise BundleError(f"{rel}: not Triton kernel metadata (no kernel name)")
    target = meta.get("target")
    if not isinstance(target, dict) or target.get("backend") != "cuda":
        raise BundleError(f"{rel}: not metadata of a CUDA kernel")
    bad = [k for k in meta if not k.isidentifier() or keyword.iskeyword(k) or k.startswith("_")]
    if bad:
        raise BundleError(f"{rel}: unexpected metadata field {bad[0]!r}")


def cache_root() -> Path:
    """kernl's per-machine cache: $KERNL_CACHE, else ~/.cache/kernl (archives unpack there too)."""
    return Path(os.environ.get("KERNL_CACHE") or Path.home() / ".cache" / "kernl")


def triton_cache_dir(root: Path | None = None) -> Path:
    """The folder Triton caches kernl's kernels and their host launchers in, one per Triton version."""
    import triton

    version = re.sub(r"[^A-Za-z0-9.+_-]", "_", triton.__version__)
    return (root or cache_root()) / "kernels" / f"triton-{version}"


def private_dir(path: Path) -> None:
    """Create path (mode 0700) or check that it is ours: Triton imports the .so files it builds there."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path):
        raise KernlError(f"{path}: kernl's kernel cache must be a plain folder")
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise KernlError(f"{path}: kernl's kernel cache must belong to this user and be writable by no one else")


def _same_bytes(path: Path, data: bytes) -> bool:
    """True when path is a regular file (not a link) holding exactly data."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        if os.fstat(f.fileno()).st_size != len(data):
            return False
        return f.read() == data


def _write_atomic(path: Path, data: bytes) -> bool:
    """Write data at path unless it is already there; readers see the old file or the new one, never a part."""
    if _same_bytes(path, data):
        return False
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def write_kernels(kernels: list[KernelFiles], folder: Path) -> int:
    """Put the kernels where Triton finds them under folder (its cache dir); returns how many files were written.

    Files already there with the same bytes are left alone, so a second load of a bundle writes nothing.
    """
    private_dir(folder)
    written = 0
    for kernel in kernels:
        kernel_dir = folder / kernel.key
        kernel_dir.mkdir(mode=0o700, exist_ok=True)
        if os.path.islink(kernel_dir) or not kernel_dir.is_dir():
            raise KernlError(f"{kernel_dir}: expected a folder of kernl's kernel cache")
        cubin, meta = kernel_dir / f"{kernel.name}.{BINARY_EXT}", kernel_dir / f"{kernel.name}.json"
        written += _write_atomic(cubin, kernel.cubin) + _write_atomic(meta, kernel.metadata)
        # The group last: Triton takes a kernel as cached once its group names files that exist.
        group = {"child_paths": {meta.name: str(meta), cubin.name: str(cubin)}}
        written += _write_atomic(kernel_dir / f"{_GROUP_PREFIX}{meta.name}", json.dumps(group).encode())
    return written


def point_triton_at(folder: Path) -> Callable[[], None]:
    """Make folder Triton's cache for the whole process; returns a function that restores the previous one."""
    import triton

    env_before = os.environ.get("TRITON_CACHE_DIR")
    cache = getattr(getattr(triton, "knobs", None), "cache", None)
    if cache is None:  # Triton before 3.4 reads the variable each time it compiles
        os.environ["TRITON_CACHE_DIR"] = str(folder)
    else:
        set_before = cache.__dict__.get("dir", _UNSET)
        cache.dir = str(folder)  # also sets TRITON_CACHE_DIR, for processes started from this one

    def restore() -> None:
        if cache is not None:
            if set_before is _UNSET:
                cache.__dict__.pop("dir", None)
            else:
                cache.__dict__["dir"] = set_before
        if env_before is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = env_before

    return restore


_UNSET = object()
_counts = {"compiled": 0, "cache_hits": 0}


def count_compiles() -> None:
    """Count Triton's compiles and cache hits in this process from now on (idempotent; keeps any listener)."""
    try:
        import triton
    except ImportError:
        return
    knobs = getattr(triton, "knobs", None)
    if knobs is None or getattr(knobs.compilation.listener, "_kernl_counter", False):
        return
    previous = knobs.compilation.listener

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        _counts["cache_hits" if cache_hit else "compiled"] += 1
        if previous is not None:
            previous(src=src, metadata=metadata, metadata_group=metadata_group, times=times, cache_hit=cache_hit)

    listener._kernl_counter = True
    knobs.compilation.listener = listener


def kernel_stats() -> dict[str, int]:
    """Triton kernels compiled, and found in a cache, in this process since counting began (see count_compiles)."""
    count_compiles()
    return dict(_counts)
