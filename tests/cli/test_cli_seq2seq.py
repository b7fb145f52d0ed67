"""Encoder-decoder tasks on the command line: `kernl-compile --task automatic-speech-recognition` (picked by
--task auto for Whisper), `kernl inspect`, `kernl run --audio FILE.wav`; text2text models kernl cannot compile
yet fail with one line."""

import wave

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kernl.artifacts.reader import open_bundle
from kernl.cli import main
from kernl.commands.tasks import infer_task
from tests.cli.conftest import WORDS

pytestmark = pytest.mark.usefixtures("cpu_references")

SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
VOCAB = ["[UNK]", *WORDS, *SPECIALS]
MEL, FRAMES, RATE = 16, 100, 16000  # a 1 s window


def _save_tokenizer(folder, vocab: list[str], specials: list[str], **tokens) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(specials)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **tokens).save_pretrained(folder)


@pytest.fixture(scope="module")
def whisper_checkpoint(tmp_path_factory):
    """A tiny random Whisper with a word-level tokenizer and a 1 s feature extractor, as from_pretrained reads it."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    folder = tmp_path_factory.mktemp("whisper")
    ids = {t: VOCAB.index(t) for t in SPECIALS}
    config = WhisperConfig(
        vocab_size=len(VOCAB), num_mel_bins=MEL, encoder_layers=1, decoder_layers=2, d_model=32,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=FRAMES // 2, max_target_positions=24,
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"], begin_suppress_tokens=None,
        suppress_tokens=None, init_std=0.3, architectures=["WhisperForConditionalGeneration"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    _save_tokenizer(folder, VOCAB, SPECIALS, eos_token="<|endoftext|>")
    WhisperFeatureExtractor(feature_size=MEL, chunk_length=FRAMES // 100).save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def whisper_bundle(tmp_path_factory, whisper_checkpoint):
    folder, _ = whisper_checkpoint
    out = tmp_path_factory.mktemp("bundles") / "whisper"
    args = [str(folder), "-o", str(out), "--batch-sizes", "2", "--max-length", "12", "--num-beams", "2"]
    result = CliRunner().invoke(main, ["compile", *args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out, result


def _write_wav(path, seconds: float, seed: int) -> torch.Tensor:
    """A 16-bit mono WAV of noise; returns the samples as read back (int16 / 32768)."""
    ints = (np.random.default_rng(seed).uniform(-0.5, 0.5, int(seconds * RATE)) * 32768).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(RATE)
        f.writeframes(ints.tobytes())
    return torch.from_numpy(ints.astype(np.float32) / 32768)


def test_infer_task_from_the_config():
    from transformers import T5Config, WhisperConfig

    assert infer_task(["WhisperForConditionalGeneration"], WhisperConfig()) == "automatic-speech-recognition"
    assert infer_task(["T5ForConditionalGeneration"], T5Config()) == "text2text-generation"
    assert infer_task(["BertForMaskedLM"], None) == "masked-lm"
    assert infer_task(["WhisperForConditionalGeneration"]) == "feature-extraction"  # no config: as before


def test_compile_speech_bundle_and_inspect(whisper_bundle):
    out, result = whisper_bundle
    manifest = open_bundle(out).manifest
    assert manifest["task"] == "automatic-speech-recognition"  # --task auto, from the config
    s2s = manifest["seq2seq"]
    assert (s2s["kind"], s2s["batch_sizes"], s2s["max_length"], s2s["num_beams"]) == ("speech", [2], 12, 2)
    assert s2s["audio"]["config"]["n_samples"] == RATE  # the checkpoint's own feature extractor
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    line = f"audio features {MEL} mel bins x {FRAMES} frames; batches 2; beams up to 2; max length 12"
    assert line in result.stdout
    shown = CliRunner().invoke(main, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    assert line in shown.stdout and "caches" in shown.stdout and "loads here" in shown.stdout


@pytest.mark.parametrize("beams", [1, 2])
def test_run_transcribes_wav_files(whisper_bundle, whisper_checkpoint, tmp_path, beams):
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    out, _ = whisper_bundle
    folder, model = whisper_checkpoint
    waves = [_write_wav(tmp_path / "a.wav", 1.0, 0), _write_wav(tmp_path / "b.wav", 0.4, 1)]
    args = ["run", str(out), "--audio", str(tmp_path / "a.wav"), "--audio", str(tmp_path / "b.wav")]
    result = CliRunner().invoke(main, [*args, "--num-beams", str(beams), "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    feats = WhisperFeatureExtractor.from_pretrained(folder)([w.numpy() for w in waves], sampling_rate=RATE,
                                                            return_tensors="pt").input_features  # fmt: skip
    with torch.no_grad():
        want = model.generate(feats, max_new_tokens=8, num_beams=beams)
    tok = AutoTokenizer.from_pretrained(folder)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    for line, name, row in zip(lines, ("a.wav", "b.wav"), want.tolist()):
        label, _, text = line.partition(": ")
        assert label.endswith(name) and text.split() == tok.decode(row, skip_special_tokens=True).split()
        assert "<|" not in text  # Whisper's special tokens are skipped


def test_run_speech_bundle_refuses_text_and_bad_audio(whisper_bundle, tmp_path):
    out, _ = whisper_bundle
    result = CliRunner().invoke(main, ["run", str(out), "--text", "hello"])
    assert result.exit_code == 2 and "give --audio" in result.stderr
    (tmp_path / "x.wav").write_bytes(b"not a wav")
    result = CliRunner().invoke(main, ["run", str(out), "--audio", str(tmp_path / "x.wav")])
    assert result.exit_code == 2 and "not a readable PCM WAV" in result.stderr
    _write_wav(tmp_path / "long.wav", 1.5, 2)
    result = CliRunner().invoke(main, ["run", str(out), "--audio", str(tmp_path / "long.wav")])
    assert result.exit_code == 2 and "window" in result.stderr


def test_speech_compile_takes_batch_sizes_only(whisper_checkpoint, tmp_path):
    folder, _ = whisper_checkpoint
    args = ["compile", str(folder), "-o", str(tmp_path / "x"), "--batch-sizes", "1", "--seq-lens", "64"]
    result = CliRunner().invoke(main, [*args, "--device", "cpu"])
    assert result.exit_code == 2 and "fixed window" in result.stderr
    args = ["compile", str(folder), "-o", str(tmp_path / "x"), "--max-length", "100", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "beyond the decoder's 24 positions" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def t5_checkpoint(tmp_path_factory):
    from transformers import T5Config, T5ForConditionalGeneration

    folder = tmp_path_factory.mktemp("t5")
    vocab = ["<pad>", "</s>", "[UNK]", *WORDS]
    config = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                      num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=3.0,
                      architectures=["T5ForConditionalGeneration"])  # fmt: skip
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    _save_tokenizer(folder, vocab, ["<pad>", "</s>"], eos_token="</s>", pad_token="<pad>")
    return folder, model


def test_text2text_compile_and_run(t5_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    folder, model = t5_checkpoint
    out = tmp_path / "t5"
    args = [str(folder), "-o", str(out), "--max-length", "8", "--batch-sizes", "2", "--seq-lens", "8"]
    result = CliRunner().invoke(main, ["compile", *args, "--num-beams", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    manifest = open_bundle(out).manifest
    assert manifest["task"] == "text2text-generation" and manifest["seq2seq"]["kind"] == "text"
    assert "text of 8 tokens; batches 2; beams up to 2; max length 8" in result.stdout
    texts = ["the cat sat on the mat", "a good movie"]
    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(texts, return_tensors="pt", padding=True)
    for beams in (1, 2):
        result = CliRunner().invoke(main, ["run", str(out), *(a for t in texts for a in ("--text", t)),
                                           "--num-beams", str(beams), "--max-new-tokens", "6"])  # fmt: skip
        assert result.exit_code == 0, result.output
        with torch.no_grad():
            want = model.generate(**batch, max_new_tokens=6, num_beams=beams)
        for line, text, row in zip(result.stdout.strip().splitlines(), texts, want.tolist()):
            assert line.split() == f"{text}: {tok.decode(row, skip_special_tokens=True)}".split(), beams
    result = CliRunner().invoke(main, ["run", str(out), "--text", "the cat", "--audio", __file__])
    assert result.exit_code == 2 and "reads text" in result.stderr


def test_a_model_kernl_cannot_compile_fails_in_one_line(t5_checkpoint, tmp_path, checkpoints, monkeypatch):
    import kernl

    def unsupported(model, *args, **kwargs):
        raise kernl.KernlError(f"{type(model).__name__}: its cross-attention is not supported yet")

    monkeypatch.setattr(kernl, "compile", unsupported)
    folder, _ = t5_checkpoint
    args = ["compile", str(folder), "-o", str(tmp_path / "out"), "--max-length", "8", "--batch-sizes", "1",
            "--seq-lens", "8", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if "error:" in line]  # beside transformers' progress
    assert lines == ["kernl compile: error: T5ForConditionalGeneration: its cross-attention is not supported yet"]
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    # An encoder-only model asked for a seq2seq task: refused before anything loads.
    args = ["compile", str(checkpoints["masked-lm"]), "-o", str(tmp_path / "o"), "--task", "text2text-generation",
            "--batch-sizes", "1", "--seq-lens", "8"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "not an encoder-decoder model" in result.stderr
