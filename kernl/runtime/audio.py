"""Whisper's log-mel features in the runtime (torch only): what WhisperFeatureExtractor computes, from the filter
bank and settings a bundle carries (kernl/compiler/audio.py), and a stdlib WAV reader.

    pad or refuse to the window (n_samples) → |STFT|² (Hann, n_fft, hop, centered, last frame dropped)
    → mel filters → log10(max(x, 1e-10)) → max(x, clip max - 8) → (x + 4) / 4          [mel, n_samples / hop]
"""

from __future__ import annotations

import os
import wave
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kernl.errors import InputError


def log_mel(
    waveform: torch.Tensor | Sequence[torch.Tensor],
    filters: torch.Tensor,
    config: dict[str, Any],
    *,
    sampling_rate: int | None = None,
) -> torch.Tensor:
    """Features [batch, feature_size, nb_max_frames] float32 on filters' device.

    waveform: one clip [samples], a batch [batch, samples], or a list of clips of different lengths; each clip
    up to config["n_samples"] samples (longer → InputError; HF would truncate) and padded with silence to it.
    filters: [1 + n_fft // 2, feature_size] from the bundle. sampling_rate: the audio's, checked when given.
    config["dither"] is ignored: dither adds noise, and Whisper's extractors set it to 0."""
    rate, n_samples, hop, n_fft = (int(config[k]) for k in ("sampling_rate", "n_samples", "hop_length", "n_fft"))
    if sampling_rate is not None and int(sampling_rate) != rate:
        raise InputError(f"audio: sampled at {sampling_rate} Hz, the model expects {rate} Hz (resample it first)")
    if isinstance(waveform, torch.Tensor):
        if waveform.dim() not in (1, 2) or not (waveform.dtype.is_floating_point or waveform.dtype == torch.int16):
            raise InputError(f"waveform: expected [samples] or [batch, samples] floats, got {waveform.dtype} "
                             f"{tuple(waveform.shape)}")  # fmt: skip
        clips = list(waveform) if waveform.dim() == 2 else [waveform]
    elif isinstance(waveform, (list, tuple)) and waveform and all(isinstance(w, torch.Tensor) for w in waveform):
        clips = list(waveform)
    else:
        raise InputError("waveform: expected a tensor or a non-empty list of 1-D tensors")
    device = filters.device
    batch = torch.full((len(clips), n_samples), float(config.get("padding_value", 0.0)), device=device)
    for i, clip in enumerate(clips):
        if clip.dim() != 1:
            raise InputError(f"waveform: clip {i} has shape {tuple(clip.shape)}, expected [samples]")
        if clip.shape[0] > n_samples:
            raise InputError(f"audio: clip {i} is {clip.shape[0] / rate:.2f} s long, the model's window is "
                             f"{n_samples / rate:.0f} s ({n_samples} samples); split it")  # fmt: skip
        batch[i, : clip.shape[0]] = clip.to(device, torch.float32)
    if not torch.isfinite(batch).all():
        raise InputError("waveform: contains NaN or infinite samples")
    window = torch.hann_window(n_fft, device=device)
    stft = torch.stft(batch, n_fft, hop, window=window, return_complex=True)
    magnitudes = (stft[..., :-1].abs() ** 2).contiguous()
    mel = filters.to(torch.float32).T @ magnitudes
    logs = torch.clamp(mel, min=1e-10).log10()
    peak = logs.amax(dim=(1, 2), keepdim=True)  # per clip, as HF's batched path
    logs = torch.maximum(logs, peak - 8.0)
    return (logs + 4.0) / 4.0


def read_wav(path: str | os.PathLike) -> tuple[torch.Tensor, int]:
    """(waveform [samples] float32 in [-1, 1], sampling rate) of a PCM WAV file (8, 16, 24 or 32-bit; channels
    averaged to mono). A missing, non-WAV or corrupt file → InputError."""
    try:
        with wave.open(os.fspath(path), "rb") as f:
            channels, width, rate, frames = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            data = f.readframes(frames)
    except (wave.Error, EOFError, OSError) as e:
        raise InputError(f"{os.fspath(path)}: not a readable PCM WAV file ({e})") from None
    if width not in (1, 2, 3, 4) or channels < 1 or rate < 1:
        raise InputError(f"{os.fspath(path)}: unsupported WAV ({width * 8}-bit, {channels} channels, {rate} Hz)")
    usable = len(data) - len(data) % (width * channels)
    if usable != frames * width * channels:
        raise InputError(f"{os.fspath(path)}: truncated WAV ({len(data)} bytes of {frames * width * channels})")
    raw = np.frombuffer(data, dtype=np.uint8)
    if width == 1:  # unsigned, offset 128
        samples = (raw.astype(np.float32) - 128.0) / 128.0
    elif width == 3:  # little-endian 24-bit: widen to int32 with the sign in the top byte
        b = raw.reshape(-1, 3).astype(np.int32)
        samples = ((b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8).astype(np.float32) / 2.0**23
    else:
        kind = np.dtype("<i2") if width == 2 else np.dtype("<i4")
        samples = np.frombuffer(data, dtype=kind).astype(np.float32) / float(2 ** (8 * width - 1))
    samples = samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(samples)), rate
