"""kernl.compile for encoder-decoder generation: export → encode and decode entries → check → bundle on disk."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from kernl.artifacts.manifest import FORMAT_VERSION, describe_target, library_versions
from kernl.artifacts.weights import save_weights
from kernl.artifacts.writer import BundleWriter
from kernl.compiler.build import StageClock, _check_metadata, _signer
from kernl.compiler.build_generation import special_tokens
from kernl.compiler.lower_seq2seq import SPEECH, Seq2SeqSettings, lower_seq2seq
from kernl.compiler.warmup_seq2seq import check_seq2seq
from kernl.errors import KernlError
from kernl.kernels.session import compile_session
from kernl.runtime.program import PROGRAM_FILE, PROGRAM_VIEW


def _ids(value) -> list[int]:
    return [] if value is None else [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def decoding_settings(model: torch.nn.Module, kind: str) -> dict:
    """Start token, forced prefix, suppressed tokens, eos and pad as the model's generate uses them."""
    config = model.config
    gen = getattr(model, "generation_config", None)

    def pick(key):
        return next((getattr(s, key) for s in (gen, config) if s is not None and getattr(s, key, None) is not None),
                    None)  # fmt: skip

    start = pick("decoder_start_token_id")
    if start is None:
        raise KernlError(f"{type(model).__name__}: no decoder_start_token_id in its (generation) config")
    prefix = [int(start)]
    forced = pick("forced_decoder_ids")  # Whisper's [(position, token), ...] after the start token
    for position, token in sorted(forced or []):
        if position == len(prefix) and token is not None:
            prefix.append(int(token))
    tokens = special_tokens(model)
    # BART-like generation configs turn on logits processors the runtime does not run (it refuses them with
    # InputError when a call asks for them): say so at compile time, since HF's generate applies them by default.
    unrun = [k for k in ("forced_bos_token_id", "forced_eos_token_id", "no_repeat_ngram_size", "min_length",
                         "min_new_tokens") if pick(k) not in (None, 0)]  # fmt: skip
    if unrun:
        warnings.warn(f"{type(model).__name__}: its generation config sets {', '.join(unrun)}; the bundle's "
                      "generate does not apply them (HF generate does)", stacklevel=2)  # fmt: skip
    return {
        "decoder_start_token_id": int(start),
        "decoder_prefix": prefix,
        "eos_token_id": tokens["eos_token_id"],
        "pad_token_id": tokens["pad_token_id"],
        "suppress_tokens": _ids(pick("suppress_tokens")),
        "begin_suppress_tokens": _ids(pick("begin_suppress_tokens")),
        # Whisper's generate returns the new tokens only; other models' return the decoder prefix too.
        "return_prefix": kind != SPEECH,
    }


def audio_settings(model: torch.nn.Module, frames: int, feature_extractor=None) -> dict | None:
    """The manifest's audio entry of a speech bundle: the feature extractor's settings and its mel filter bank,
    stored sparse (each frequency bin feeds at most two mel filters: about 400 non-zeros of 201 x mels), so the
    runtime computes log-mel features with no transformers. feature_extractor: a WhisperFeatureExtractor or a
    folder / preprocessor_config.json; by default Whisper's, at the model's mel bins and window (None when the
    window is not a whole number of seconds at 16 kHz: such a bundle takes input_features only)."""
    from kernl.compiler.audio import whisper_audio_settings

    if feature_extractor is None:
        hop, rate = 160, 16000
        if frames * hop % rate:
            return None
        from transformers import WhisperFeatureExtractor

        mels = int(model.config.num_mel_bins)
        feature_extractor = WhisperFeatureExtractor(feature_size=mels, chunk_length=frames * hop // rate)
    settings = whisper_audio_settings(feature_extractor)
    config, filters = settings["config"], settings["tensors"]["mel_filters"]
    if config["feature_size"] != int(model.config.num_mel_bins) or config["nb_max_frames"] != frames:
        raise KernlError(f"feature extractor: {config['feature_size']} mel bins x {config['nb_max_frames']} frames, "
                         f"the model reads {model.config.num_mel_bins} x {frames}")  # fmt: skip
    flat = filters.flatten()
    index = flat.nonzero().flatten()
    # float32 → Python float (float64) → JSON repr round-trips exactly.
    sparse = {"shape": list(filters.shape), "index": index.tolist(), "values": flat[index].double().tolist()}
    return {"config": config, "mel_filters": sparse}


def compile_seq2seq(
    model: torch.nn.Module,
    output_dir: str | os.PathLike,
    *,
    settings: Seq2SeqSettings,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    tokenizer=None,
    overwrite: bool = False,
    archive: bool = False,
    progress=None,
    metadata: dict | None = None,
    sign_key=None,
    feature_extractor=None,
) -> Path:
    """Compile an encoder-decoder model (Whisper-like: decoder_position_ids) into a seq2seq generation bundle.
    feature_extractor (speech): whose log-mel settings the bundle computes from audio (see audio_settings)."""
    metadata = _check_metadata(metadata)
    timed = StageClock(progress)
    stage = timed.progress
    sign = _signer(sign_key)
    low = lower_seq2seq(model, settings, dtype=dtype, device=device, stage=timed)
    decoding = decoding_settings(low.model, settings.kind)
    if len(decoding["decoder_prefix"]) >= settings.max_length:
        raise KernlError(f"max_length {settings.max_length} leaves no room after the decoder prefix")
    vocab = low.spec.outputs[0]["dims"][1]
    if feature_extractor is not None and settings.kind != SPEECH:
        raise KernlError("feature_extractor: only for speech models (Whisper-like)")
    audio = audio_settings(low.model, settings.seq_lens[-1], feature_extractor) if settings.kind == SPEECH else None
    with BundleWriter(output_dir, overwrite=overwrite, archive=archive) as writer, compile_session() as kernels_used:
        writer.write_text(PROGRAM_FILE, json.dumps(low.spec.data(), allow_nan=False, separators=(",", ":")))
        writer.write_text(PROGRAM_VIEW, low.source)
        timed("warm-up")
        checks = check_seq2seq(low, on_bucket=lambda what: stage(f"warm-up {what}"))
        timed("save")
        kernels = kernels_used.save(writer.root) if low.device.type == "cuda" else 0
        aliases = save_weights(low.weights, writer.root / "weights.safetensors")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(writer.root / "tokenizer"))
        cache_bytes = sum(
            torch.Size(s["shape"]).numel() * torch.empty((), dtype=getattr(torch, s["dtype"])).element_size()
            for s in low.spec.state
        )
        config = low.model.config
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": type(low.model).__name__,
            "versions": library_versions(),
            "target": describe_target(low.device),
            "dtype": str(low.dtype).removeprefix("torch."),
            "export_mode": "nonstrict-dynamic",
            **low.spec.manifest_entries(),
            "buckets": [list(b) for b in settings.encode_buckets()],
            "seq2seq": {
                **settings.to_json(),
                "vocab_size": vocab,
                "enc_len": low.enc_len,
                "num_mel_bins": int(config.num_mel_bins) if settings.kind == SPEECH else None,
                **decoding,
                **({"audio": audio} if audio is not None else {}),
                "cache": {
                    "layers": low.layout.layers,
                    "self_heads": low.layout.self_heads,
                    "cross_heads": low.layout.cross_heads,
                    "head_dim": low.layout.head_dim,
                    "decode_rows": settings.decode_rows,
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
