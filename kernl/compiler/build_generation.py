"""kernl.compile for text generation: export → prefill and decode entries → warm-up and check → bundle on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from kernl.artifacts.manifest import FORMAT_VERSION, describe_target, library_versions
from kernl.artifacts.weights import save_weights
from kernl.artifacts.writer import BundleWriter
from kernl.compiler.build import StageClock, _check_metadata, _signer
from kernl.compiler.lower_generation import GenerationSettings, lower_generation
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
) -> Path:
    """Compile a causal LM into a generation bundle (prefill per prompt bucket, decode step per batch bucket)."""
    metadata = _check_metadata(metadata)
    timed = StageClock(progress)
    stage = timed.progress
    sign = _signer(sign_key)
    low = lower_generation(model, settings, dtype=dtype, device=device, stage=timed)
    vocab = low.spec.outputs[0]["dims"][1]
    with BundleWriter(output_dir, overwrite=overwrite, archive=archive) as writer, compile_session() as kernels_used:
        writer.write_text(PROGRAM_FILE, json.dumps(low.spec.data(), allow_nan=False, separators=(",", ":")))
        writer.write_text(PROGRAM_VIEW, low.source)
        timed("warm-up")
        checks = check_generation(low, on_bucket=lambda what: stage(f"warm-up {what}"))
        timed("save")
        kernels = kernels_used.save(writer.root) if low.device.type == "cuda" else 0
        aliases = save_weights(low.weights, writer.root / "weights.safetensors")
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
                    "bytes": cache_bytes,
                },
            },
            "rewrites": low.report,
            "weights": {"file": "weights.safetensors", "aliases": aliases},
            "checks": checks,
            "kernels": {"triton": kernels, "autotune": "kernels/autotune.json" if kernels else None},
        }
        timed("end")
        manifest["build_seconds"] = timed.seconds()
        manifest.update(metadata)
        path = writer.commit(manifest, sign=sign)
    return path
