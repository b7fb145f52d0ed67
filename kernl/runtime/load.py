"""kernl.load: verify a bundle, bind its program from data, load its weights and kernels, capture its graphs.

Nothing from the bundle runs as code: the program is data checked against an allow-list, kernels are device
code that Triton launches through host code built on this machine, and every byte used is the byte verified.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from kernl.artifacts.reader import VerifiedBundle, open_bundle
from kernl.artifacts.weights import load_weights
from kernl.errors import BundleError
from kernl.runtime.bundle import CAPTURE_MODES, Bundle
from kernl.runtime.compat import resolve_device
from kernl.runtime.program import FORWARD, ProgramSpec


def load(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    *,
    verify: bool = True,
    cuda_graphs: bool = True,
    capture: str = "all",
    recompile: bool = False,
    trusted_keys: Iterable | None = None,
) -> Bundle:
    """Load the bundle at path (a folder or a .kernl archive) onto device (default: its target's kind when this
    machine has it).

    verify checks every file's sha256. On CUDA, cuda_graphs replays one graph per bucket, captured at load
    (capture="all") or on each bucket's first call (capture="lazy"). trusted_keys (Ed25519 public keys: PEM
    paths or bytes) refuses bundles not signed by one of them. A bundle built for another GPU architecture,
    Triton or torch raises BundleError, or with recompile=True warns and compiles its kernels here.
    """
    if capture not in CAPTURE_MODES:
        raise ValueError(f"capture: expected one of {', '.join(CAPTURE_MODES)}, got {capture!r}")
    timings: dict[str, float] = {}
    mark = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timings[name] = now - mark
        mark = now

    files = open_bundle(path, verify=verify)
    manifest = files.manifest
    signer = _check_signature(manifest, trusted_keys)
    device = resolve_device(manifest, device)
    phase("manifest_s")
    # The weights are read (and hashed) in a thread while the program binds and the kernels install: file
    # reads and hashing release the GIL that imports hold.
    with ThreadPoolExecutor(1, thread_name_prefix="kernl-weights") as pool:
        loading = pool.submit(load_weights, files, device, verify=verify)
        spec = ProgramSpec.from_bundle(manifest, _json(files, manifest["program"]["file"]))
        program = spec.bind() if FORWARD in spec.entries else None  # generation bundles bind in Bundle
        phase("bind_s")
        scope = _kernels(files, device, recompile=recompile)
        phase("kernels_s")
        tensors, weights_verified = loading.result()
    try:
        weights = [tensors[name] for name in spec.weights]
    except KeyError as err:
        raise BundleError(f"{manifest['weights']['file']}: no tensor {err} that the program needs") from None
    phase("weights_wait_s")
    # The weights' hash may finish in its thread while the graphs are captured; a mismatch raises before load
    # returns.
    try:
        bundle = Bundle(
            manifest,
            spec,
            program,
            weights,
            device,
            cuda_graphs=cuda_graphs,
            capture=capture,
            scope=scope,
            tokenizer=lambda: _tokenizer(files),
        )
    finally:
        weights_verified()
    phase("graphs_s")
    bundle.signed_by = signer
    bundle.load_timings = {**timings, **bundle.load_timings}
    return bundle


def _json(files: VerifiedBundle, rel: str):
    try:
        return json.loads(files.read(rel))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{rel}: not valid JSON ({err})") from None


def _check_signature(manifest: dict, trusted_keys: Iterable | None) -> str | None:
    if trusted_keys is None and "signature" not in manifest:
        return None
    from kernl.artifacts.signing import check_signature

    return check_signature(manifest, trusted_keys)


def _kernels(files: VerifiedBundle, device: torch.device, *, recompile: bool):
    """The bundle's kernels installed for this machine; returns the scope its program runs in (its autotune
    decisions, frozen), or None on CPU."""
    from kernl.runtime.bundle_kernels import bundle_scope

    return bundle_scope(files, device, recompile=recompile)


def _tokenizer(files: VerifiedBundle):
    from kernl.runtime.tokenizer import load_tokenizer

    return load_tokenizer(files)
