"""Whisper log-mel features in the runtime: equal to WhisperFeatureExtractor's, from a bundle's filters and
settings; the stdlib WAV reader; bad audio → InputError."""

import math
import wave

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from kernl import InputError
from kernl.compiler.audio import whisper_audio_settings
from kernl.runtime.audio import log_mel, read_wav

RATE = 16000
# HF's torch path runs the same float32 ops in the same process: equal to float32 rounding, bitwise in practice.
TOL = dict(atol=1e-6, rtol=0)


def _hf(extractor, clips):
    return extractor([c.numpy() for c in clips], sampling_rate=RATE, return_tensors="pt").input_features


def _sine(n, hz):
    return (0.6 * torch.sin(torch.arange(n) / RATE * 2 * math.pi * hz)).float()


@pytest.mark.parametrize("feature_size", [80, 128])
def test_features_equal_hf(feature_size):
    extractor = WhisperFeatureExtractor(feature_size=feature_size)
    settings = whisper_audio_settings(extractor)
    filters, config = settings["tensors"]["mel_filters"], settings["config"]
    assert filters.shape == (201, feature_size) and config["n_samples"] == 30 * RATE
    n = config["n_samples"]
    clips = [torch.randn(1) * 0.3, torch.randn(399), _sine(12345, 440.0), torch.randn(5 * RATE + 7) * 0.05,
             _sine(n, 1234.5), torch.randn(n)]  # fmt: skip
    want = _hf(extractor, clips)
    got = log_mel(clips, filters, config)  # a ragged batch
    assert got.shape == (len(clips), feature_size, 3000) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOL)
    # One clip and a [batch, samples] tensor give the same rows (the clamp to max - 8 is per clip).
    torch.testing.assert_close(log_mel(clips[2], filters, config), want[2:3], **TOL)
    torch.testing.assert_close(log_mel(torch.stack(clips[4:]), filters, config), want[4:], **TOL)


def test_settings_from_saved_config(tmp_path):
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=10)
    extractor.save_pretrained(tmp_path)
    for source in (tmp_path, tmp_path / "preprocessor_config.json"):
        settings = whisper_audio_settings(source)
        assert settings["config"]["n_samples"] == 10 * RATE
        assert torch.equal(settings["tensors"]["mel_filters"], torch.from_numpy(extractor.mel_filters).float())
    clip = torch.randn(3 * RATE)
    torch.testing.assert_close(log_mel(clip, settings["tensors"]["mel_filters"], settings["config"]),
                               _hf(extractor, [clip]), **TOL)  # fmt: skip


def _write_wav(path, samples: np.ndarray, width: int, channels: int, rate: int = RATE):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(samples.tobytes())


@pytest.mark.parametrize("width,channels", [(1, 1), (2, 1), (2, 2), (3, 1), (4, 2)])
def test_wav_round_trip(tmp_path, width, channels):
    n = 4000
    values = np.random.default_rng(width * 10 + channels).uniform(-0.9, 0.9, (n, channels))
    scale = 2.0 ** (8 * width - 1)
    ints = np.round(values * scale).astype(np.int64)
    if width == 1:
        raw = (ints + 128).astype(np.uint8)
    elif width == 3:
        raw = np.stack([(ints >> s) & 0xFF for s in (0, 8, 16)], axis=-1).astype(np.uint8)
    else:
        raw = ints.astype("<i2" if width == 2 else "<i4")
    _write_wav(tmp_path / "a.wav", raw, width, channels)
    samples, rate = read_wav(tmp_path / "a.wav")
    assert rate == RATE and samples.dtype == torch.float32 and samples.shape == (n,)
    want = torch.from_numpy((ints / scale).mean(axis=1)).float()
    torch.testing.assert_close(samples, want, atol=1e-6, rtol=0)
    # And on to features, as `kernl run --audio` does.
    extractor = WhisperFeatureExtractor()
    settings = whisper_audio_settings(extractor)
    torch.testing.assert_close(log_mel(samples, settings["tensors"]["mel_filters"], settings["config"],
                                       sampling_rate=rate), _hf(extractor, [samples]), **TOL)  # fmt: skip


def test_bad_audio_is_input_error(tmp_path):
    settings = whisper_audio_settings(WhisperFeatureExtractor())
    filters, config = settings["tensors"]["mel_filters"], settings["config"]
    with pytest.raises(InputError, match="8000 Hz"):
        log_mel(torch.randn(800), filters, config, sampling_rate=8000)
    with pytest.raises(InputError, match="window"):
        log_mel(torch.randn(config["n_samples"] + 1), filters, config)
    with pytest.raises(InputError):
        log_mel(torch.randn(2, 2, 100), filters, config)
    with pytest.raises(InputError):
        log_mel(torch.tensor([0.0, float("nan")]), filters, config)
    (tmp_path / "text.wav").write_text("not audio at all")
    _write_wav(tmp_path / "ok.wav", np.zeros(1000, dtype="<i2"), 2, 1)
    (tmp_path / "cut.wav").write_bytes((tmp_path / "ok.wav").read_bytes()[:500])
    (tmp_path / "empty.wav").write_bytes(b"")
    for name in ("text.wav", "cut.wav", "empty.wav", "missing.wav"):
        with pytest.raises(InputError):
            read_wav(tmp_path / name)
