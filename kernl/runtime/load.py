"""kernl.load: verify a bundle, load its weights onto the device, and bind its program."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kernl.artifacts.archive import unpack
from kernl.artifacts.kernel_cache import use_bundle_kernels
from kernl.artifacts.reader import read_manifest, verify_hashes
from kernl.artifacts.weights import load_weights
from kernl.errors import BundleError
from kernl.runtime.bundle import Bundle
from kernl.runtime.compat import check_kernels, resolve_device
from kernl.runtime.program import Program, program_from_namespace


def bind_program(path: Path, weight_count: int) -> Program:
    """exec program.py and return its head and tail (weight_count: how many weights it takes)."""
    namespace: dict = {"__name__": "kernl_program", "__file__": str(path)}
    try:
        exec(compile(path.read_text(), str(path), "exec"), namespace)
    except SyntaxError as err:
        raise BundleError(f"{path}: not a valid program ({err.msg}, line {err.lineno})") from None
    if not callable(namespace.get("forward")):
        raise BundleError(f"{path}: defines no forward()")
    return program_from_namespace(namespace, weight_count)


def load(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    *,
    verify: bool = True,
    cuda_graphs: bool = True,
    recompile: bool = False,
) -> Bundle:
    """Load the bundle at path onto device (default: its target's kind when this machine has it).

    verify checks every file's sha256; on CUDA, cuda_graphs captures one graph per bucket at load.
    A bundle built for another GPU architecture, Triton or torch raises BundleError, or with recompile=True
    warns and compiles its kernels here.
    """
    timings: dict[str, float] = {}
    mark = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timings[name] = now - mark
        mark = now

    root = Path(path)
    if root.is_file():
        root = unpack(root)
        phase("unpack_s")
    manifest = read_manifest(root, verify=verify, hash_files=False)
    weights_file = manifest["weights"]["file"]
    if verify:
        # Every file but the weights is checked before anything runs from it (program.py, kernels).
        verify_hashes(root, manifest, [rel for rel in manifest["files"] if rel != weights_file])
    phase("manifest_s")
    # The weights (most of the bytes) hash in a thread while they load and the graphs are captured: hashlib
    # releases the GIL. A mismatch still raises before load returns, and explains any failure it caused.
    with ThreadPoolExecutor(1, thread_name_prefix="kernl-verify") as pool:
        hashed = pool.submit(verify_hashes, root, manifest, [weights_file] if verify else [])
        try:
            bundle = _build(root, manifest, device, cuda_graphs=cuda_graphs, recompile=recompile, phase=phase)
        except Exception:
            hashed.result()
            raise
        hashed.result()
    phase("weights_hash_wait_s")
    bundle.load_timings = {**timings, **bundle.load_timings}
    return bundle


def _build(root: Path, manifest: dict, device, *, cuda_graphs: bool, recompile: bool, phase) -> Bundle:
    """Weights onto the device, the program bound, the graphs captured."""
    device = resolve_device(manifest, device)
    if device.type == "cuda" and check_kernels(manifest, device, recompile=recompile):
        use_bundle_kernels(root)
    phase("device_s")
    weights_file = manifest["weights"]["file"]
    try:
        tensors = load_weights(root / weights_file, manifest["weights"]["aliases"], device)
        weights = [tensors[name] for name in manifest["program"]["weights"]]
    except KeyError as err:
        raise BundleError(f"{weights_file}: no tensor {err} that the program needs") from None
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types on corrupt files
        raise BundleError(f"{weights_file}: unreadable ({err})") from None
    phase("weights_s")
    program = bind_program(root / manifest["program"]["file"], len(weights))
    phase("bind_s")
    bundle = Bundle(manifest, program, weights, device, cuda_graphs=cuda_graphs)
    phase("graphs_s")
    return bundle
