"""What a Whisper bundle carries to compute log-mel features without transformers: the mel filter bank and the
STFT/window settings of the model's WhisperFeatureExtractor (kernl/runtime/audio.py consumes them)."""

from __future__ import annotations

import os
from typing import Any

import torch

from kernl.errors import KernlError


def whisper_audio_settings(extractor: Any) -> dict[str, Any]:
    """{"tensors": {"mel_filters": [1 + n_fft // 2, feature_size] float32}, "config": {...JSON...}} from a
    WhisperFeatureExtractor, or from a directory or preprocessor_config.json it was saved to."""
    if isinstance(extractor, (str, os.PathLike)):
        from transformers import WhisperFeatureExtractor

        path = os.fspath(extractor)
        try:
            if os.path.isfile(path):
                extractor = WhisperFeatureExtractor.from_json_file(path)
            else:
                extractor = WhisperFeatureExtractor.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise KernlError(f"{path}: not a Whisper feature extractor config ({e})") from None
    needed = ("mel_filters", "n_fft", "hop_length", "sampling_rate", "n_samples", "feature_size")
    missing = [name for name in needed if not hasattr(extractor, name)]
    if missing:
        raise KernlError(f"feature extractor: {type(extractor).__name__} lacks {missing} (not a Whisper one?)")
    if getattr(extractor, "do_normalize", False):
        raise KernlError("feature extractor: do_normalize=True is not supported (Whisper's extractors leave it off)")
    # HF's torch path casts the float64 bank to float32 before its matmul: store what it multiplies by.
    filters = torch.from_numpy(extractor.mel_filters).to(torch.float32).contiguous()
    config = {
        "feature_size": int(extractor.feature_size),
        "sampling_rate": int(extractor.sampling_rate),
        "n_fft": int(extractor.n_fft),
        "hop_length": int(extractor.hop_length),
        "chunk_length": int(extractor.chunk_length),
        "n_samples": int(extractor.n_samples),
        "nb_max_frames": int(extractor.nb_max_frames),
        "padding_value": float(extractor.padding_value),
        "dither": float(getattr(extractor, "dither", 0.0)),
    }
    if filters.shape != (1 + config["n_fft"] // 2, config["feature_size"]):
        raise KernlError(f"feature extractor: mel filters of shape {tuple(filters.shape)} do not fit n_fft "
                         f"{config['n_fft']} and feature_size {config['feature_size']}")  # fmt: skip
    return {"tensors": {"mel_filters": filters}, "config": config}
