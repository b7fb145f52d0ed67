"""kernl.compile: export → rewrite → program source → warm-up and check → bundle on disk."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from kernl.artifacts.manifest import FORMAT_VERSION, describe_target, library_versions
from kernl.artifacts.weights import save_weights
from kernl.artifacts.writer import BundleWriter
from kernl.compiler.lower import _weights as _weights  # re-exported: tests and scripts rewrite programs with it
from kernl.compiler.lower import lower_model
from kernl.compiler.meta import check_weights_source, read_weights_from
from kernl.compiler.warmup import warm_up
from kernl.compiler.warmup_sharded import warm_up_sharded, warm_up_unchecked
from kernl.errors import KernlError
from kernl.kernels.session import compile_session
from kernl.runtime.program import PROGRAM_FILE, PROGRAM_VIEW

# Keys compile_model writes into the manifest; metadata= may add others, never replace these.
MANIFEST_KEYS = frozenset(
    "format_version model versions target dtype export_mode inputs outputs buckets rewrites program weights checks "
    "kernels build_seconds files digest generation tensor_parallel".split()
)


class StageClock:
    """Calls progress(name) as each compile stage starts and records when; seconds() gives each stage's length."""

    def __init__(self, progress=None) -> None:
        self.progress = progress or (lambda name: None)
        self.starts: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        self.progress(name)
        self.starts[name] = time.perf_counter()

    def seconds(self) -> dict[str, float]:
        stamps = list(self.starts.items())
        return {a: round(tb - ta, 3) for (a, ta), (_, tb) in zip(stamps, stamps[1:])}


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
    sign_key=None,
    tensor_parallel: int = 1,
    weights_from: str | os.PathLike | None = None,
) -> Path:
    """Compile model into a bundle at output_dir; returns its path. See kernl.compile.

    tensor_parallel: split the program over this many ranks (GPUs of one host); the bundle then holds one
    weights file per rank (weights.rank<r>.safetensors) and kernl.load runs under torchrun.

    metadata: extra JSON-serialisable manifest entries (e.g. task, source model), added beside kernl's own.
    sign_key: an Ed25519 private key (PEM path or bytes) that signs the manifest.
    weights_from: for a model on the meta device, the safetensors files its weights are read from, one tensor at
    a time (kernl.compiler.meta); its outputs are then not compared with the eager model's.
    """
    metadata = _check_metadata(metadata)
    check_weights_source(model, weights_from)
    timed = StageClock(progress)
    stage = timed.progress
    sign = _signer(sign_key)
    low = lower_model(
        model, buckets, dtype=dtype, device=device, example_inputs=example_inputs, stage=timed,
        tensor_parallel=tensor_parallel,
    )  # fmt: skip
    model, device, buckets = low.model, low.device, low.buckets
    eager = not read_weights_from(low.weights, weights_from)
    with BundleWriter(output_dir, overwrite=overwrite, archive=archive) as writer, compile_session() as kernels_used:
        writer.write_text(PROGRAM_FILE, json.dumps(low.spec.data(), allow_nan=False, separators=(",", ":")))
        writer.write_text(PROGRAM_VIEW, low.source)
        timed("warm-up")
        on_bucket = lambda b: stage(f"warm-up {b[0]}x{b[1]}")  # noqa: E731
        if not eager:
            checks = warm_up_unchecked(
                low.bind(), low.shard, low.weights, low.spec.weights, low.make_inputs, buckets, device,
                low.input_names, on_bucket=on_bucket,
            )  # fmt: skip
        elif low.shard is None:
            checks = warm_up(
                low.bind(), model, low.make_inputs, buckets, device, low.weight_list(), low.input_names,
                on_bucket=on_bucket,
            )  # fmt: skip
        else:  # every rank as a thread of this process, summing over the threads
            checks = warm_up_sharded(
                low.bind(), low.shard, low.weights, low.spec.weights, model, low.make_inputs, buckets, device,
                low.input_names, on_bucket=on_bucket,
            )  # fmt: skip
        timed("save")
        kernels = kernels_used.save(writer.root) if device.type == "cuda" else 0
        weights_entry = _save_weights(low, writer.root)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(writer.root / "tokenizer"))
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": type(model).__name__,
            "versions": library_versions(),
            "target": describe_target(device),
            "dtype": str(low.dtype).removeprefix("torch."),
            "export_mode": low.mode,
            **low.spec.manifest_entries(),
            "buckets": [list(b) for b in buckets],
            "rewrites": low.report,
            "weights": weights_entry,
            "checks": checks,
            "kernels": {"triton": kernels, "autotune": "kernels/autotune.json" if kernels else None},
        }
        if low.shard is not None:
            backend = "nccl" if device.type == "cuda" else "gloo"
            manifest["tensor_parallel"] = {**low.shard.describe(), "backend": backend}
            if (limit := low.shard.id_limit()) is not None:
                manifest["inputs"] = [
                    {**s, "limit": limit} if s["name"] == "input_ids" else s for s in manifest["inputs"]
                ]
        timed("end")
        manifest["build_seconds"] = timed.seconds()
        manifest.update(metadata)
        path = writer.commit(manifest, sign=sign)
    return path


def _save_weights(low, root: Path) -> dict:
    """The manifest's "weights": one file, or with tensor parallelism one per rank, each written (and freed)
    before the next is made."""
    if low.shard is None:
        return {"file": "weights.safetensors", "aliases": save_weights(low.weights, root / "weights.safetensors")}
    files = [f"weights.rank{r}.safetensors" for r in range(low.shard.world_size)]
    aliases = [save_weights(low.rank_weights(r), root / rel) for r, rel in enumerate(files)]
    if any(a != aliases[0] for a in aliases):  # ties are between replicated weights: the same on every rank
        raise KernlError("tensor parallel: the ranks' weights are tied differently")
    # "file" is rank 0's, for readers of one file (kernl inspect); kernl.load reads "ranks"[its rank].
    return {"file": files[0], "aliases": aliases[0], "ranks": files}


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


def _signer(sign_key):
    if sign_key is None:
        return None
    from kernl.artifacts.signing import signer

    return signer(sign_key)
