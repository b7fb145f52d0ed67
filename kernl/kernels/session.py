"""Triton and autotune state as explicit sessions: one per compile, one per loaded bundle.

Compile:   with compile_session() as s:  warm-up runs, kernels compile (or come from a cache) and tune
           s.save(bundle_root)           kernels/ gets exactly the kernels and decisions this compile used
Load:      k = install_kernels(files, device)   device code into the per-machine cache, decisions frozen
           with k.active(): ...                 the program runs with the bundle's own decisions

Triton keeps compiled kernels in memory per @triton.jit function, for the whole process. A compile session
starts those caches empty for kernl's functions, so every kernel the compile uses is fetched again (from a
disk cache, or compiled) and shows up as its own, even one an earlier compile in this process already used;
the kernels held before stay alive (a loaded bundle's CUDA graphs launch them) and come back when it ends.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch

from kernl.errors import BundleError, KernlError
from kernl.kernels import autotune_cache
from kernl.kernels.triton_cache import (
    AUTOTUNE_FILE,
    KernelFiles,
    count_compiles,
    parse_members,
    point_triton_at,
    private_dir,
    triton_cache_dir,
    write_kernels,
)
from kernl.kernels.triton_key import use_machine_triton_key

_one_compile = threading.Lock()
_compiling_thread: int | None = None
# Kernels displaced from Triton's in-memory caches when a session ends; Triton 3.9 unloads a kernel's module
# when its object dies, which would break CUDA graphs that captured it.
_retired: list = []


def _jit_functions() -> list:
    """kernl's @triton.jit functions, unwrapped from any autotuner or heuristics around them."""
    try:
        from triton.runtime.jit import JITFunction, KernelInterface
    except ImportError:
        return []
    found: dict[int, object] = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("kernl.") or module is None:
            continue
        for value in list(vars(module).values()):
            fn, depth = value, 0
            while isinstance(fn, KernelInterface) and not isinstance(fn, JITFunction) and depth < 4:
                fn, depth = getattr(fn, "fn", None), depth + 1  # an autotuner or heuristics around the function
            if isinstance(fn, JITFunction):
                found.setdefault(id(fn), fn)
    return list(found.values())


def _kernel_caches(fn) -> list[dict]:
    """The per-device dicts of compiled kernels of one JIT function (Triton 3.x: device_caches[dev][0])."""
    caches = []
    for entry in getattr(fn, "device_caches", {}).values():
        if isinstance(entry, tuple) and entry and isinstance(entry[0], dict):
            caches.append(entry[0])
    return caches


class CompileSession:
    """What one compile used: its kernels (read from Triton's in-memory caches) and its autotune decisions."""

    def __init__(self, *, reuse: bool = True) -> None:
        self.tuner = autotune_cache.Tuner(reuse=reuse, aside=self._aside)
        self._swapped: list[tuple[object, dict]] = []
        self._kernels: list[KernelFiles] | None = None  # fixed when the session ends
        self._timed: list[dict] = []  # caches filled while timing candidates, alive as long as the session

    def kernels(self) -> list[KernelFiles]:
        """Every kernel compiled or fetched for kernl's functions since the session started."""
        if self._kernels is not None:
            return list(self._kernels)
        found: dict[str, KernelFiles] = {}
        for fn in _jit_functions():
            for cache in _kernel_caches(fn):
                for kernel in list(cache.values()):
                    group = getattr(kernel, "metadata_group", None)
                    if isinstance(group, dict):  # not a pending async compile
                        files = _kernel_files(group)
                        found.setdefault(files.key, files)
        return [found[key] for key in sorted(found)]

    def save(self, bundle_root: str | Path) -> int:
        """Write kernels/ into bundle_root: this session's kernels and decisions only; returns how many kernels."""
        root = Path(bundle_root)
        kernels = self.kernels()
        for kernel in kernels:
            for rel, data in kernel.files().items():
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        path = root / AUTOTUNE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.tuner.export(), indent=1, sort_keys=True))
        return len(kernels)

    def _start(self) -> None:
        for fn in _jit_functions():
            self._swapped.append((fn, _fresh_caches(fn)))

    @contextmanager
    def _aside(self) -> Iterator[None]:
        """Time candidates with kernels kept apart: a losing config's kernel is not this compile's, and the
        winner's is fetched again (from Triton's disk cache) when the launcher runs it for real."""
        held = [(fn, _fresh_caches(fn)) for fn in _jit_functions()]
        try:
            yield
        finally:
            for fn, caches in held:
                self._timed.append(fn.device_caches)
                fn.device_caches = caches

    def _end(self) -> None:
        self._kernels = self.kernels()
        for fn, old in self._swapped:
            current = fn.device_caches
            for device, entry in old.items():
                if device not in current:
                    current[device] = entry
                    continue
                kernels = current[device][0]
                for key, kernel in entry[0].items():
                    if key in kernels and kernels[key] is not kernel:
                        _retired.append(kernels[key])
                    kernels[key] = kernel  # the object loaded bundles may have captured
        self._swapped = []


def _fresh_caches(fn) -> dict:
    """Give fn empty in-memory kernel caches; returns the ones it had."""
    old = fn.device_caches
    fn.device_caches = defaultdict(old.default_factory) if isinstance(old, defaultdict) else {}
    return old


def _kernel_files(group: dict[str, str]) -> KernelFiles:
    """A kernel's cubin and metadata, read from the files Triton's group lists."""
    meta = [Path(p) for c, p in group.items() if c.endswith(".json") and not c.startswith("__grp__")]
    cubin = [Path(p) for c, p in group.items() if c.endswith(".cubin")]
    if len(meta) != 1 or len(cubin) != 1:
        raise KernlError(f"a Triton kernel without one cubin and one metadata file: {sorted(group)}")
    try:
        kernel = KernelFiles(meta[0].parent.name, meta[0].stem, cubin[0].read_bytes(), meta[0].read_bytes())
    except OSError as err:
        raise KernlError(f"Triton's cache lost a kernel this compile used ({err})") from None
    try:
        parse_members(kernel.files())  # what a load will accept
    except BundleError as err:
        raise KernlError(f"a kernel kernl could not ship: {err}") from None
    return kernel


@contextmanager
def compile_session(*, reuse: bool = True, cache: Path | None = None) -> Iterator[CompileSession]:
    """A compile's Triton and autotune state; save() it into the bundle. One at a time per process.

    reuse: take decisions benchmarked earlier in this process (other compiles) instead of timing again.
    cache: Triton's cache during the session (default: kernl's per-machine cache on CUDA machines, so the
    launchers Triton builds there serve later loads; left alone elsewhere). Restored at the end.
    """
    global _compiling_thread
    if _compiling_thread == threading.get_ident():
        raise KernlError("compile_session: already in a compile session in this thread")
    with _one_compile:
        _compiling_thread = threading.get_ident()
        session = CompileSession(reuse=reuse)
        if cache is None and torch.cuda.is_available():
            cache = triton_cache_dir()
        restore = None
        if cache is not None:
            private_dir(cache)  # Triton builds and imports its launchers there
            restore = point_triton_at(cache)
        count_compiles()
        session._start()
        try:
            with autotune_cache.use(session.tuner):
                yield session
        finally:
            try:
                session._end()
            finally:
                if restore is not None:
                    restore()
                _compiling_thread = None


class KernelSession:
    """A loaded bundle's kernels on this machine and its autotune decisions, frozen.

    active() (or calling the session): the context the bundle's program runs in (warm-up, capture, eager
    calls), so its decisions apply there and nowhere else; a later compile in this process still tunes.
    """

    def __init__(self, tuner: autotune_cache.Tuner, kernels: int, cache_dir: Path | None) -> None:
        self.tuner = tuner
        self.kernels = kernels
        self.cache_dir = cache_dir

    def __repr__(self) -> str:
        return f"<kernl KernelSession: {self.kernels} kernels in {self.cache_dir}, {self.tuner!r}>"

    def active(self) -> AbstractContextManager:
        return autotune_cache.use(self.tuner)

    __call__ = active  # a scope factory, as the runner takes one

    def stats(self) -> dict[str, int]:
        """This bundle's autotune counters: hits, defaults_used (shapes it was not warmed for), ..."""
        return self.tuner.stats()


def install_kernels(
    files: Mapping[str, bytes], device: str | torch.device, *, cache: Path | None = None
) -> KernelSession:
    """Install a bundle's verified kernels/ members for this machine; compiles and tunes nothing.

    files: path relative to the bundle (kernels/...) -> the bytes that were verified. A member that is not a
    kernel's cubin or metadata, or autotune.json, is a BundleError: nothing else is ever written or run.
    On CUDA, the device code goes into the per-machine cache (cache, default kernl's) and Triton's cache
    points there, where Triton builds its host launchers itself.
    """
    kernels, autotune = parse_members(files)
    tuner = autotune_cache.Tuner(frozen=True)
    if autotune is not None:
        try:
            tuner.load(json.loads(autotune))
        except (ValueError, UnicodeDecodeError) as err:
            raise BundleError(f"{AUTOTUNE_FILE}: {err}") from None
    folder = None
    if torch.device(device).type == "cuda" and kernels:
        folder = cache or triton_cache_dir()
        write_kernels(kernels, folder)
        point_triton_at(folder)
        use_machine_triton_key()
    count_compiles()
    return KernelSession(tuner, len(kernels), folder)
