"""Tiny random-init Hugging Face models built from configs, shared by the tests."""

import torch
from transformers import BertConfig, BertModel


def tiny_bert(**overrides) -> BertModel:
    config = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    config.update(overrides)
    return BertModel(BertConfig(**config)).eval()


def token_inputs(batch: int, seq: int, vocab: int = 99) -> dict[str, torch.Tensor]:
    """Random ids and a right-padded mask, as a tokenizer makes for a batch of unequal texts."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        mask[row, torch.randint(1, seq + 1, ()).item() :] = 0
    return {"input_ids": torch.randint(0, vocab, (batch, seq)), "attention_mask": mask}
