"""kernl.compile: export → rewrite → program source → warm-up and check → bundle on disk."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from kernl.artifacts.archive import pack
from kernl.artifacts.kernel_cache import cached_kernel_count, save_kernels
from kernl.artifacts.manifest import FORMAT_VERSION, describe_target, library_versions
from kernl.artifacts.weights import save_weights
from kernl.artifacts.writer import BundleWriter
from kernl.compiler.lower import _weights as _weights  # re-exported: tests and scripts rewrite programs with it
from kernl.compiler.lower import lower_model
from kernl.compiler.warmup import warm_in_fresh_process, warm_up
from kernl.errors import KernlError
from kernl.runtime.load import bind_program

# Keys compile_model writes into the manifest; metadata= may add others, never replace these.
MANIFEST_KEYS = frozenset(
    "format_version model versions target dtype export_mode inputs outputs buckets rewrites program weights checks "
    "kernels build_seconds files digest".split()
)


def compile_model(
    model: torch.nn.Module,
    output_dir: str | os.PathLike,
    *,
    buckets: Sequence[tuple[int, int]],
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    example_inputs: dict[str, torch.Tensor] | None = None,
    tokenizer=None,
    overwrite: bool = False,
    archive: bool = False,
    progress=None,
    metadata: dict | None = None,
) -> Path:
    """Compile model into a bundle at output_dir; returns its path. See kernl.compile.

    metadata: extra JSON-serialisable manifest entries (e.g. task, source model), added beside kernl's own.
    """
    metadata = _check_metadata(metadata)
    stage = progress or (lambda name: None)
    timings: dict[str, float] = {}

    def timed(name: str):
        stage(name)
        timings[name] = time.perf_counter()

    low = lower_model(model, buckets, dtype=dtype, device=device, example_inputs=example_inputs, stage=timed)
    model, device, buckets = low.model, low.device, low.buckets
    with BundleWriter(output_dir, overwrite=overwrite) as writer:
        program_path = writer.write_text("program.py", low.source)
        timed("warm-up")
        program = bind_program(program_path, len(low.weight_names))
        checks = warm_up(
            program,
            model,
            low.make_inputs,
            buckets,
            device,
            low.weight_list(),
            low.input_names,
            on_bucket=lambda b: stage(f"warm-up {b[0]}x{b[1]}"),
        )
        timed("save")
        kernels = save_kernels(writer.root) if device.type == "cuda" else 0
        aliases = save_weights(low.weights, writer.root / "weights.safetensors")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(writer.root / "tokenizer"))
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": type(model).__name__,
            "versions": library_versions(),
            "target": describe_target(device),
            "dtype": str(low.dtype).removeprefix("torch."),
            "export_mode": low.mode,
            "inputs": [s.to_json() for s in low.specs],
            "outputs": low.outputs,
            "buckets": [list(b) for b in buckets],
            "rewrites": low.report,
            "program": {"file": "program.py", "weights": low.weight_names, "inputs": low.input_names},
            "weights": {"file": "weights.safetensors", "aliases": aliases},
            "checks": checks,
            "kernels": {"triton": kernels, "autotune": "kernels/autotune.json" if kernels else None},
        }
        timed("end")
        stamps = list(timings.items())
        manifest["build_seconds"] = {a: round(tb - ta, 3) for (a, ta), (_, tb) in zip(stamps, stamps[1:])}
        manifest.update(metadata)
        if device.type == "cuda":
            # Load the bundle once in a fresh process, with Triton's cache pointed at it: the launchers and
            # utilities Triton builds on first use land in the bundle too, so production loads build nothing.
            stage("seal")
            writer.write_manifest(manifest)
            warm_in_fresh_process(writer.root)
            manifest["kernels"]["triton"] = cached_kernel_count(writer.root)
        path = writer.commit(manifest)
    if archive:
        pack(path)
    return path


def _check_metadata(metadata: dict | None) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise KernlError("metadata: expected a dict with string keys")
    clash = sorted(MANIFEST_KEYS & set(metadata))
    if clash:
        raise KernlError(f"metadata: {', '.join(clash)} are kernl's own manifest entries")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as err:
        raise KernlError(f"metadata: not JSON-serialisable ({err})") from None
    return dict(metadata)
