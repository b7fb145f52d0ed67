"""Tiny random-init Hugging Face models built from configs, shared by the tests."""

import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel


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


def tiny_gpt2(**overrides) -> GPT2Model:
    config = dict(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    config.update(overrides)
    return GPT2Model(GPT2Config(**config)).eval()


def tiny_llama(**overrides) -> LlamaModel:
    """Grouped-query attention (4 q heads, 2 kv heads), rotary, RMSNorm and a SwiGLU MLP."""
    config = dict(
        vocab_size=99,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    config.update(overrides)
    return LlamaModel(LlamaConfig(**config)).eval()
