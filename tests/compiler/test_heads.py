"""Task heads on top of the three families compile, match the model, and keep their output names."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import kernl
from tests.models import token_inputs

SMALL = dict(vocab_size=99, max_position_embeddings=64)
BERT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, **SMALL)
LLAMA = dict(
    hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, **SMALL
)
HEADS = {
    "bert-masked-lm": lambda: BertForMaskedLM(BertConfig(**BERT)),
    "bert-classifier": lambda: BertForSequenceClassification(BertConfig(num_labels=3, **BERT)),
    "gpt2-lm": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=2, n_positions=64)),
    "llama-causal-lm": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA)),
}


def _check(name: str, device: str, dtype: torch.dtype, tmp_path, tol: float) -> None:
    model = HEADS[name]().eval()
    path = kernl.compile(model, tmp_path / name, buckets=[(2, 16)], device=device, dtype=dtype)
    bundle = kernl.load(path)
    inputs = token_inputs(2, 11)
    out = bundle(**{k: v.to(device) for k, v in inputs.items()})
    ref_model = model.to(device=device, dtype=dtype)
    with torch.no_grad():
        want = ref_model(**{k: v.to(device) for k, v in inputs.items()}).logits
    assert list(out) == ["logits"]
    got = out.logits.float()
    assert got.shape == want.shape
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.float().flatten(), dim=0) >= 0.999
    assert (got - want.float()).abs().max() <= tol


@pytest.mark.parametrize("name", list(HEADS))
def test_heads_match_on_cpu(name, tmp_path):
    _check(name, "cpu", torch.float32, tmp_path, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(HEADS))
def test_heads_match_on_cuda_fp16(name, tmp_path):
    _check(name, "cuda", torch.float16, tmp_path, 5e-2)


class _DataDependent(torch.nn.Module):
    config = BertConfig(vocab_size=10)

    def forward(self, input_ids, attention_mask=None):
        if input_ids.sum() > 10:  # a branch on data: Dynamo cannot export it, non-strict export neither
            return input_ids * 2
        return input_ids


def test_unexportable_model_fails_with_a_short_reason(tmp_path):
    with pytest.raises(kernl.KernlError) as err:
        kernl.compile(_DataDependent(), tmp_path / "b", buckets=[(1, 8)], device="cpu")
    message = str(err.value)
    assert "export" in message
    assert message.count("\n") <= 3, message
    assert not (tmp_path / "b").exists()
