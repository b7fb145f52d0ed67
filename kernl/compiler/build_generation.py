"""kernl.compile for text generation: export → prefill and decode entries → warm-up and check → bundle on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from kernl.artifacts.manifest import FORMAT_VERSION, describe_target, library_versions
from kernl.artifacts.writer import BundleWriter
from kernl.compiler.build import StageClock, _check_metadata, _save_weights, _signer
from kernl.compiler.lower_generation import GenerationSettings, lower_generation
from kernl.compiler.meta import check_weights_source, read_weights_from
from kernl.compiler.warmup_generation import check_generation
from kernl.kernels.session import compile_session
from kernl.runtime.program import PROGRAM_FILE, PROGRAM_VIEW


def special_tokens(model: torch.nn.Module) -> dict:
    """eos / pad / bos ids from the model's generation config (else its config), as generate would use them."""
    out = {}
    sources = [getattr(model, "generation_config", None), getattr(model, "config", None)]
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        value = next((getattr(s, key) for s in sources if s is not None and getattr(s, key, None) is not None), None)
        if isinstance(value, (list, tuple)):
            value = [int(v) for v in value]
        out[key] = value if value is None or isinstance(value, list) else int(value)
    return out


def compile_generation(
    model: torch.nn.Module,
    output_dir: str | os.PathLike,
    *,
    settings: GenerationSettings,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    tokenizer=None,
    overwrite: bool = False,
    archive: bool = False,
    progress=None,
    metadata: dict | None = None,
    sign_key=None,
    tensor_parallel: int = 1,
    weights_from: str | os.PathLike | None = None,
) -> Path:
    """Compile a causal LM into a generation bundle (prefill per prompt bucket, decode step per batch bucket).

    tensor_parallel: split it over this many ranks: one program whose KV cache holds heads_kv / N heads per
    rank, and one weights file per rank (see kernl.compiler.build.compile_model).
    weights_from: for a model on the meta device, the safetensors files its weights are read from, one tensor at
    a time (kernl.compiler.meta); its outputs are then not compared with the eager model's.
    """
    metadata = _check_metadata(metadata)
    check_weights_source(model, weights_from)
    timed = StageClock(progress)
    stage = timed.progress
    sign = _signer(sign_key)
    low = lower_generation(model, settings, dtype=dtype, device=device, stage=timed, tensor_parallel=tensor_parallel)
    eager = not read_weights_from(low.weights, weights_from)
    vocab = low.spec.outputs[0]["dims"][1]
    with BundleWriter(output_dir, overwrite=overwrite, archive=archive) as writer, compile_session() as kernels_used:
        writer.write_text(PROGRAM_FILE, json.dumps(low.spec.data(), allow_nan=False, separators=(",", ":")))
        writer.write_text(PROGRAM_VIEW, low.source)
        timed("warm-up")
        checks = check_generation(low, on_bucket=lambda what: stage(f"warm-up {what}"), eager=eager)
        timed("save")
        kernels = kernels_used.save(writer.root) if low.device.type == "cuda" else 0
        weights_entry = _save_weights(low, writer.root)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(writer.root / "tokenizer"))
        cache_bytes = sum(
            torch.Size(s["shape"]).numel() * torch.empty((), dtype=getattr(torch, s["dtype"])).element_size()
            for s in low.spec.state
        )
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": type(low.model).__name__,
            "versions": library_versions(),
            "target": describe_target(low.device),
            "dtype": str(low.dtype).removeprefix("torch."),
            "export_mode": low.mode,
            **low.spec.manifest_entries(),
            "buckets": [list(b) for b in settings.prefill_buckets()],
            "generation": {
                **settings.to_json(),
                "vocab_size": vocab,
                **special_tokens(low.model),
                "cache": {
                    "layers": low.layout.layers,
                    "heads_kv": low.layout.heads_kv,
                    "head_dim": low.layout.head_dim,
                    "rows": settings.rows,
                    "bytes": cache_bytes,  # per rank, as heads_kv, with tensor parallelism
                },
            },
            "rewrites": low.report,
            "weights": weights_entry,
            "checks": checks,
            "kernels": {"triton": kernels, "autotune": "kernels/autotune.json" if kernels else None},
        }
        if low.shard is not None:
            backend = "nccl" if low.device.type == "cuda" else "gloo"
            manifest["tensor_parallel"] = {**low.shard.describe(), "backend": backend}
        timed("end")
        manifest["build_seconds"] = timed.seconds()
        manifest.update(metadata)
        path = writer.commit(manifest, sign=sign)
    return path
