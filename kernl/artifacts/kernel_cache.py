"""The bundle's kernels/ folder: Triton's compiled kernels and kernl's autotune decisions.

At compile time, every kernel compiled in this process for kernl's Triton functions is copied from Triton's
cache into the bundle. At load, Triton's cache is pointed at that folder, so the same kernels load from disk
instead of compiling, and the autotune decisions are loaded frozen, so nothing is benchmarked.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

KERNELS_DIR = "kernels"
TRITON_DIR = "kernels/triton"
AUTOTUNE_FILE = "kernels/autotune.json"


def _jit_functions():
    """kernl's @triton.jit functions, unwrapped from any autotuner or heuristics around them."""
    from triton.runtime.jit import JITFunction

    seen = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("kernl.kernels") or module is None:
            continue
        for value in vars(module).values():
            fn, depth = value, 0
            while not isinstance(fn, JITFunction) and hasattr(fn, "fn") and depth < 4:
                fn, depth = fn.fn, depth + 1
            if isinstance(fn, JITFunction) and id(fn) not in seen:
                seen.add(id(fn))
                yield fn


def _compiled_dirs() -> set[Path]:
    """Triton cache folders of every kernel compiled in this process for kernl's functions."""
    dirs = set()
    for fn in _jit_functions():
        for cache in getattr(fn, "device_caches", {}).values():
            kernels = cache[0] if isinstance(cache, tuple) else {}
            for kernel in kernels.values():
                group = getattr(kernel, "metadata_group", None) or {}
                for path in group.values():
                    dirs.add(Path(path).parent)
    return {d for d in dirs if d.is_dir()}


def save_kernels(bundle_root: Path) -> int:
    """Copy compiled kernels and autotune decisions into the bundle; returns how many kernels."""
    from kernl.kernels import autotune_cache

    target = bundle_root / TRITON_DIR
    target.mkdir(parents=True, exist_ok=True)
    dirs = _compiled_dirs()
    for d in dirs:
        shutil.copytree(d, target / d.name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("lock", "*.tmp*"))
    (bundle_root / AUTOTUNE_FILE).write_text(json.dumps(autotune_cache.export(), indent=1, sort_keys=True))
    return len(dirs)


def use_bundle_kernels(bundle_root: Path) -> None:
    """Point Triton's cache at the bundle's kernels and load its autotune decisions, frozen."""
    from kernl.kernels import autotune_cache

    triton_dir = bundle_root / TRITON_DIR
    if triton_dir.is_dir():
        try:
            import triton

            triton.knobs.cache.dir = str(triton_dir)
        except (ImportError, AttributeError):  # older Triton reads the variable when it compiles
            os.environ["TRITON_CACHE_DIR"] = str(triton_dir)
    tuned = bundle_root / AUTOTUNE_FILE
    if tuned.is_file():
        autotune_cache.load(json.loads(tuned.read_text()))
        autotune_cache.set_frozen(True)


def cached_kernel_count(bundle_root: Path) -> int:
    triton_dir = bundle_root / TRITON_DIR
    return sum(1 for d in triton_dir.iterdir() if d.is_dir()) if triton_dir.is_dir() else 0
