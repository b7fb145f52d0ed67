"""Tiny random-init encoders of the encoder-decoder families: T5 (relative position bias, RMS norm, optionally
v1.1's gated GELU) and Whisper (conv front end over log-mel features, fixed window)."""

import torch
from transformers import T5Config, T5EncoderModel, WhisperConfig, WhisperModel


def tiny_t5_encoder(**overrides) -> T5EncoderModel:
    config = dict(
        vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
    )  # fmt: skip
    config.update(overrides)
    return T5EncoderModel(T5Config(**config)).eval()


def tiny_whisper_encoder(**overrides) -> torch.nn.Module:
    """WhisperModel's encoder: 12 mel bins, a window of 2 * 24 = 48 frames."""
    config = dict(
        vocab_size=99, num_mel_bins=12, d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, max_source_positions=24,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    config.update(overrides)
    return WhisperModel(WhisperConfig(**config)).get_encoder().eval()


def t5_inputs(batch: int, seq: int, vocab: int = 99) -> dict[str, torch.Tensor]:
    """Random ids, right padding of a random length in every row but the first."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        mask[row, torch.randint(1, seq + 1, ()).item() :] = 0
    return {"input_ids": torch.randint(0, vocab, (batch, seq)), "attention_mask": mask}
