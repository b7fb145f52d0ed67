"""kernl.load: verify a bundle, bind its program from data, load its weights and kernels, capture its graphs.

Nothing from the bundle runs as code: the program is data checked against an allow-list, kernels are device
code that Triton launches through host code built on this machine, and every byte used is the byte verified.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from kernl.artifacts.reader import VerifiedBundle, open_bundle
from kernl.artifacts.weights import load_weights
from kernl.errors import BundleError
from kernl.runtime.bundle import CAPTURE_MODES, Bundle
from kernl.runtime.compat import resolve_device
from kernl.runtime.limits import table_limits, with_limits
from kernl.runtime.program import FORWARD, ProgramSpec
from kernl.runtime.tensor_parallel import place


def load(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    *,
    verify: bool = True,
    cuda_graphs: bool = True,
    capture: str = "all",
    recompile: bool = False,
    trusted_keys: Iterable | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    timeout_s: float = 300.0,
) -> Bundle:
    """Load the bundle at path (a folder or a .kernl archive) onto device (default: its target's kind when this
    machine has it).

    verify checks every file's sha256. On CUDA, cuda_graphs replays one graph per bucket, captured at load
    (capture="all") or on each bucket's first call (capture="lazy"). trusted_keys (Ed25519 public keys: PEM
    paths or bytes) refuses bundles not signed by one of them. A bundle built for another GPU architecture,
    Triton or torch raises BundleError, or with recompile=True warns and compiles its kernels here.

    A tensor-parallel bundle (kernl.compile(..., tensor_parallel=N)) loads in each of N processes, launched by
    torchrun (or given rank= and world_size=, with their process group started or MASTER_ADDR/MASTER_PORT set):
    each loads its rank's weights on its own GPU (cuda:LOCAL_RANK), and every rank must then be called with the
    same inputs. Another world size, another bundle or GPU on some rank, or a rank that fails to load raise
    BundleError on every rank; the ranks' checks time out after timeout_s instead of waiting forever.
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
    placement = place(manifest, device, rank=rank, world_size=world_size, timeout_s=timeout_s)
    device = placement.device
    phase("manifest_s")
    # The weights are read (and hashed) in a thread while the program binds and the kernels install: file
    # reads and hashing release the GIL that imports hold.
    with ThreadPoolExecutor(1, thread_name_prefix="kernl-weights") as pool:
        loading = pool.submit(load_weights, files, device, verify=verify, file=placement.weights_file)
        spec = ProgramSpec.from_bundle(manifest, _json(files, manifest["program"]["file"]))
        program = spec.bind() if FORWARD in spec.entries else None  # generation bundles bind in Bundle
        phase("bind_s")
        scope = _kernels(files, device, recompile=recompile)
        phase("kernels_s")
        tensors, weights_verified = loading.result()
    failure = None
    try:  # nothing has run yet: the weights must fit the program first
        weights = program_weights(spec, tensors, manifest, placement.weights_file)
        spec = with_input_limits(spec, tensors)
    except BundleError as err:
        failure = err
        try:
            weights_verified()  # a corrupt file says so, rather than what its corruption looks like
        except BundleError as corrupt:
            failure = corrupt
    # Every rank learns whether all of them loaded their part before any waits for the others at an all-reduce.
    placement.all_ready(failure)
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
    bundle.rank, bundle.world_size = placement.rank, placement.world_size
    if placement.world_size > 1:
        bundle.shared_seed = placement.same_seed
        bundle.placement = placement
    bundle.load_timings = {**timings, **bundle.load_timings}
    return bundle


def program_weights(
    spec: ProgramSpec, tensors: dict[str, torch.Tensor], manifest: dict, file: str | None = None
) -> list[torch.Tensor]:
    """The program's weights in its order, once the weights file is checked against the program: it holds every
    weight the program names and nothing else, each of the shape and dtype the manifest's program declares
    (program.weight_specs, when present). with_input_limits checks the tables the inputs index."""
    rel = file or manifest["weights"]["file"]
    missing = [name for name in spec.weights if name not in tensors]
    if missing:
        raise BundleError(f"{rel}: no tensor {missing[0]!r}, which the program needs")
    unused = sorted(set(tensors) - set(spec.weights))
    if unused:
        raise BundleError(f"{rel}: holds {unused[0]!r}, which the program does not name (another model's weights?)")
    declared = manifest["program"].get("weight_specs")
    if declared is not None:
        if len(declared) != len(spec.weights):
            raise BundleError(f"manifest.json: program.weight_specs lists {len(declared)} weights, the program "
                              f"{len(spec.weights)}")  # fmt: skip
        for name, want in zip(spec.weights, declared):
            t = tensors[name]
            got = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            if got != {"shape": want["shape"], "dtype": want["dtype"]}:
                raise BundleError(f"{rel}: {name!r} is {got['dtype']} {got['shape']}; the program was compiled for "
                                  f"{want['dtype']} {want['shape']}")  # fmt: skip
    return [tensors[name] for name in spec.weights]


def with_input_limits(spec: ProgramSpec, tensors: dict[str, torch.Tensor]) -> ProgramSpec:
    """The spec with each input that indexes a table (token ids) carrying its "limit": the manifest's, else the
    rows of the table the program reads with it (see kernl.runtime.limits). Calls are checked against it."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}

    def limited(specs: list, head: Any) -> list:
        if not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in specs):
            return specs  # the entry's own checks refuse it
        found = table_limits(spec.functions, head, spec.weights, [s["name"] for s in specs], shapes)
        return with_limits(specs, found, "manifest.json")

    inputs, entries = spec.inputs, dict(spec.entries)
    for entry, info in spec.entries.items():
        if not isinstance(info, dict):
            continue
        if entry == FORWARD:
            inputs = limited(spec.inputs, info.get("head"))
        elif isinstance(info.get("inputs"), list):
            entries[entry] = {**info, "inputs": limited(info["inputs"], info.get("head"))}
    return dataclasses.replace(spec, inputs=inputs, entries=entries)


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
    decisions, frozen), or None on CPU. A kernel cache that cannot be written is a BundleError, as every OSError
    of loading is."""
    from kernl.runtime.bundle_kernels import bundle_scope

    try:
        return bundle_scope(files, device, recompile=recompile)
    except OSError as err:
        raise BundleError(f"{files.root}: its kernels cannot be installed in kernl's cache ({err})") from None


def _tokenizer(files: VerifiedBundle):
    from kernl.runtime.tokenizer import load_tokenizer

    return load_tokenizer(files)
