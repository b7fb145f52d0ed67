"""Triton's version key, kept per machine: Triton recomputes it in every process by hashing its own sources and
its native library (hundreds of MB), which cost 0.35 s of a bundle's first output on an H200 host.

The key is stored in kernl's private per-machine cache, stamped with the path, size, mtime and inode of every
.py and .so file of the installed Triton; any change to the installation recomputes it. Triton's own
compile-worker pool replaces `triton.runtime.cache.triton_key` the same way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from kernl.kernels.triton_cache import _write_atomic, cache_root, private_dir


def _installation_stamp(root: Path) -> str:
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.endswith((".py", ".so")):
                st = os.stat(os.path.join(folder, name))
                digest.update(f"{folder}/{name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}\n".encode())
    return digest.hexdigest()


def use_machine_triton_key() -> None:
    """Give Triton its version key from kernl's machine cache (computed and stored there on the first use)."""
    try:
        import triton
        import triton.runtime.cache as triton_cache
    except ImportError:
        return
    compute = getattr(triton_cache, "triton_key", None)
    info = getattr(compute, "cache_info", None)
    if info is None or info().currsize:  # not the function we know, or already computed in this process
        return
    folder = cache_root()
    private_dir(folder)
    file = folder / f"triton-key-{triton.__version__}.json"
    stamp = _installation_stamp(Path(triton.__file__).parent)
    try:
        stored = json.loads(file.read_text())
        key = stored["key"] if stored.get("stamp") == stamp else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        key = None
    if not isinstance(key, str):
        key = compute()
        _write_atomic(file, json.dumps({"stamp": stamp, "key": key}).encode())
    triton_cache.triton_key = functools.lru_cache(maxsize=None)(lambda: key)
