"""Speech bundles compute Whisper's log-mel features themselves: the bundle's features equal
WhisperFeatureExtractor's on random waveforms, and generate(audio=...) equals generate(input_features=...).
The bundle serves batch 1 with 2 beams: its encoder is exported at batch 1 while its decoder takes 2 rows."""

import numpy as np
import pytest
import torch

import kernl
from kernl.compiler.build_seq2seq import audio_settings

pytestmark = pytest.mark.usefixtures("cpu_references")

MEL, FRAMES, VOCAB, RATE = 16, 100, 120, 16000  # a 1 s window: 100 frames of 10 ms


def tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=MEL, encoder_layers=1, decoder_layers=2, d_model=32,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=FRAMES // 2, max_target_positions=32, decoder_start_token_id=100,
        eos_token_id=67, pad_token_id=67, bos_token_id=67, begin_suppress_tokens=None, suppress_tokens=None,
        init_std=0.3,
    )  # fmt: skip
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(config).eval()


def extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=MEL, chunk_length=FRAMES // 100)


@pytest.fixture(scope="module")
def speech_bundle(tmp_path_factory):
    model = tiny_whisper()
    path = tmp_path_factory.mktemp("s2s-audio") / "whisper"
    kernl.compile(model, path, buckets=None, device="cpu", feature_extractor=extractor(),
                  generation={"max_length": 12, "batch_sizes": [1], "num_beams": 2})  # fmt: skip
    return model, kernl.load(path)


def test_features_equal_the_feature_extractor(speech_bundle):
    _, bundle = speech_bundle
    fe = extractor()
    clips = [torch.randn(RATE) * 0.2, torch.randn(RATE // 3) * 0.5]  # a full window and a short clip
    want = fe([c.numpy() for c in clips], sampling_rate=RATE, return_tensors="pt").input_features
    for i, clip in enumerate(clips):  # a tensor, a numpy array, a list of one
        for given in (clip, clip.numpy(), [clip]):
            got = bundle._seq2seq.features(given)
            assert got.shape == (1, MEL, FRAMES)
            torch.testing.assert_close(got, want[i : i + 1], atol=1e-5, rtol=0)


def test_generate_from_audio_equals_generate_from_features(speech_bundle):
    model, bundle = speech_bundle
    fe = extractor()
    clip = torch.randn(RATE // 2) * 0.3
    feats = fe([clip.numpy()], sampling_rate=RATE, return_tensors="pt").input_features
    for options in ({"max_new_tokens": 8}, {"max_new_tokens": 6, "num_beams": 2}):
        want = bundle.generate(input_features=feats, **options)
        assert torch.equal(bundle.generate(audio=clip, **options), want), options
        assert torch.equal(bundle.generate(audio=[clip.numpy()], sampling_rate=RATE, **options), want), options
        with torch.no_grad():
            assert torch.equal(want, model.generate(feats, **options)), options  # and both are HF's tokens


def test_bad_audio(speech_bundle):
    _, bundle = speech_bundle
    with pytest.raises(kernl.InputError, match="window"):
        bundle.generate(audio=torch.randn(RATE + 1), max_new_tokens=4)
    with pytest.raises(kernl.InputError, match="Hz"):
        bundle.generate(audio=torch.randn(RATE), sampling_rate=8000, max_new_tokens=4)
    with pytest.raises(kernl.InputError, match="not both"):
        bundle.generate(audio=torch.randn(RATE), input_features=torch.randn(1, MEL, FRAMES), max_new_tokens=4)
    with pytest.raises(kernl.InputError, match="batch 2"):
        bundle.generate(audio=[torch.randn(RATE)] * 2, max_new_tokens=4)
    with pytest.raises(kernl.InputError, match="audio"):
        bundle.generate(audio="speech.wav", max_new_tokens=4)
    with pytest.raises(kernl.InputError, match="NaN"):
        bundle.generate(audio=torch.full((RATE,), float("nan")), max_new_tokens=4)
    assert bundle.generate(audio=np.zeros(RATE // 4, dtype=np.float32), max_new_tokens=3).shape == (1, 3)


def test_manifest_carries_the_filter_bank_sparse(speech_bundle):
    model, bundle = speech_bundle
    audio = bundle.manifest["seq2seq"]["audio"]
    assert audio["config"]["n_samples"] == RATE and audio["mel_filters"]["shape"] == [201, MEL]
    dense = torch.from_numpy(extractor().mel_filters).float()
    assert len(audio["mel_filters"]["index"]) == int((dense != 0).sum()) < dense.numel() // 4
    assert torch.equal(bundle._seq2seq.settings.mel_filters(), dense)
    # A window that is not whole seconds at 16 kHz has no default extractor: such bundles take features only.
    assert audio_settings(model, 48) is None


@pytest.mark.gpu
def test_audio_on_cuda(tmp_path):
    model = tiny_whisper().cuda()
    path = kernl.compile(model, tmp_path / "w", buckets=None, device="cuda", feature_extractor=extractor(),
                         generation={"max_length": 12, "batch_sizes": [1, 2], "num_beams": 2})  # fmt: skip
    bundle = kernl.load(path)
    clips = [torch.randn(RATE) * 0.3, torch.randn(RATE // 2) * 0.3]
    want = extractor()([c.numpy() for c in clips], sampling_rate=RATE, return_tensors="pt").input_features
    torch.testing.assert_close(bundle._seq2seq.features(clips).cpu(), want, atol=1e-4, rtol=0)
    for options in ({"max_new_tokens": 8}, {"max_new_tokens": 6, "num_beams": 2}):
        got = bundle.generate(audio=clips, **options)
        assert torch.equal(got, bundle.generate(input_features=bundle._seq2seq.features(clips), **options))
