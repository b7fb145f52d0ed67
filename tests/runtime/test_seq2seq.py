"""Encoder-decoder generation bundles (tiny random Whisper, CPU fp32): greedy and beam search from a bundle on
disk, loaded in a fresh process, token for token equal to transformers' generate; bad calls → InputError."""

import pytest
import torch

import kernl
from tests.runtime.seq2seq_fresh import generate_in_fresh_process

pytestmark = pytest.mark.usefixtures("cpu_references")

MEL, FRAMES, VOCAB = 16, 48, 120


def tiny_whisper(eos: int = 101):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=MEL, encoder_layers=2, decoder_layers=2, d_model=32,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=FRAMES // 2, max_target_positions=64, decoder_start_token_id=100,
        eos_token_id=eos, pad_token_id=eos, bos_token_id=eos, begin_suppress_tokens=None, suppress_tokens=None,
        init_std=0.3,  # wide enough that greedy picks vary from token to token
    )  # fmt: skip
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def whisper_bundle(tmp_path_factory):
    # eos 67: a frequent token of this random model, so rows stop at different steps.
    model = tiny_whisper(eos=67)
    path = tmp_path_factory.mktemp("s2s") / "whisper"
    kernl.compile(model, path, buckets=None, device="cpu",
                  generation={"max_length": 32, "batch_sizes": [1, 4], "num_beams": 4})  # fmt: skip
    return model, path


def test_whisper_generate_matches_hf_in_a_fresh_process(whisper_bundle, tmp_path):
    model, path = whisper_bundle
    one, three = torch.randn(1, MEL, FRAMES), torch.randn(3, MEL, FRAMES)
    calls = {
        "greedy_1": {"input_features": one, "max_new_tokens": 12},
        "greedy_3": {"input_features": three, "max_new_tokens": 12},
        "beams_1": {"input_features": one, "max_new_tokens": 10, "num_beams": 3},
        "beams_3": {"input_features": three, "max_new_tokens": 10, "num_beams": 4, "length_penalty": 0.5},
        "beams_early": {"input_features": three, "max_new_tokens": 10, "num_beams": 2, "early_stopping": True},
    }
    got = generate_in_fresh_process(path, calls, tmp_path)
    for name, call in calls.items():
        with torch.no_grad():
            want = model.generate(**call)
        assert got[name] == want.tolist(), name


def test_whisper_bad_inputs(whisper_bundle):
    _, path = whisper_bundle
    bundle = kernl.load(path)
    feats = torch.randn(1, MEL, FRAMES)
    with pytest.raises(kernl.InputError, match="input_features"):
        bundle.generate(input_features=torch.randn(1, MEL, FRAMES + 2), max_new_tokens=4)
    with pytest.raises(kernl.InputError, match="input_features"):
        bundle.generate(input_features=torch.randn(5, MEL, FRAMES), max_new_tokens=4)
    with pytest.raises(kernl.InputError, match="num_beams"):
        bundle.generate(input_features=feats, max_new_tokens=4, num_beams=5)
    with pytest.raises(kernl.InputError, match="max_new_tokens"):
        bundle.generate(input_features=feats, max_new_tokens=40)
    with pytest.raises(kernl.InputError, match="decoder_prefix"):
        bundle.generate(input_features=feats, max_new_tokens=4, decoder_prefix=[VOCAB])
    with pytest.raises(kernl.InputError, match="input_ids"):
        bundle.generate(input_ids=torch.tensor([[1, 2]]), max_new_tokens=4)
    bad = feats.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(kernl.InputError, match="NaN"):
        bundle.generate(input_features=bad, max_new_tokens=4)
    # A bundle still works after refusing calls.
    assert bundle.generate(input_features=feats, max_new_tokens=3).shape == (1, 3)


@pytest.mark.gpu
def test_whisper_generate_on_cuda_graphs(tmp_path):
    model = tiny_whisper(eos=67).cuda()
    path = kernl.compile(model, tmp_path / "w", buckets=None, device="cuda",
                         generation={"max_length": 32, "batch_sizes": [1, 4], "num_beams": 4})  # fmt: skip
    bundle = kernl.load(path)
    feats = torch.randn(3, MEL, FRAMES, device="cuda")
    for options in ({}, {"num_beams": 4}):
        want = model.generate(feats, max_new_tokens=10, **options).cpu()
        got = bundle.generate(input_features=feats, max_new_tokens=10, **options)
        # fp32 on the GPU: kernels may differ from eager in the last bits, which can flip a near tie.
        assert (got == want).float().mean() > 0.9, (options, got, want)
    assert bundle._seq2seq.step_graphs  # decode steps ran as captured graphs
