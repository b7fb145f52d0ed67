"""optimize_model: the forward runs through kernl in place; eager fallback with one warning."""

import warnings

import pytest
import torch

import kernl
from kernl.model_optimization import KernlForward, bucket_for, optimize_model
from kernl.runtime.output import BundleOutput
from tests.models import tiny_bert, token_inputs


def _twins(**overrides):
    """An optimized tiny BERT and an untouched copy with the same weights."""
    model, reference = tiny_bert(**overrides), tiny_bert(**overrides)
    reference.load_state_dict(model.state_dict())
    return optimize_model(model), reference


class BranchOnData(torch.nn.Module):
    """A forward torch.export cannot trace: Python control flow on a tensor's values."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = tiny_bert(max_position_embeddings=16)
        self.config = self.bert.config

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if bool((attention_mask == 0).any()):
            return hidden * attention_mask.unsqueeze(-1)
        return hidden


def test_bucket_for():
    assert bucket_for(1, 1, 512) == (1, 64)
    assert bucket_for(3, 64, 512) == (4, 64)
    assert bucket_for(5, 65, 512) == (8, 128)
    assert bucket_for(8, 500, 512) == (8, 512)
    assert bucket_for(2, 10, 16) == (2, 16)
    assert bucket_for(2, 100, None) == (2, 128)


def test_outputs_match_for_two_shapes_under_inference_mode():
    model, reference = _twins(max_position_embeddings=16)
    assert isinstance(model.forward, KernlForward)
    for batch, seq in [(2, 10), (3, 7)]:  # buckets 2x16 and 4x16
        inputs = token_inputs(batch, seq)
        with torch.inference_mode():
            got = model(**inputs)
        with torch.no_grad():
            want = reference(**inputs)
        assert isinstance(got, BundleOutput)
        assert list(got) == ["last_hidden_state", "pooler_output"]
        assert got.last_hidden_state.shape == (batch, seq, 32)
        assert (got.last_hidden_state - want.last_hidden_state).abs().max() <= 1e-4
        assert (got.pooler_output - want.pooler_output).abs().max() <= 1e-4
    (programs,) = model.forward.programs.values()
    assert len(programs) == 1  # one dynamic export serves both buckets


def test_positional_input_and_return_dict_false():
    model, reference = _twins(max_position_embeddings=16)
    inputs = token_inputs(1, 5)
    with torch.no_grad():
        got = model(inputs["input_ids"], attention_mask=inputs["attention_mask"], return_dict=False)
        want = reference(**inputs).last_hidden_state
    assert isinstance(got, tuple) and len(got) == 2
    assert (got[0] - want).abs().max() <= 1e-4


def test_unsupported_call_runs_eagerly_with_one_warning():
    model, reference = _twins()
    inputs = token_inputs(2, 5)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = [model(**inputs, output_hidden_states=True) for _ in range(2)]
        want = reference(**inputs, output_hidden_states=True)
    assert len(caught) == 1 and "output_hidden_states=True" in str(caught[0].message)
    assert len(got[0].hidden_states) == len(want.hidden_states)  # the model's own output type
    assert torch.equal(got[1].last_hidden_state, want.last_hidden_state)
    assert not model.forward.programs


def test_non_exportable_forward_warns_once_and_stays_correct():
    model = BranchOnData().eval()
    calls = [token_inputs(2, 10), token_inputs(3, 7)]
    with torch.no_grad():
        want = [model(**inputs) for inputs in calls]
    kernl.optimize_model(model)  # the lazy export in kernl/__init__.py
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = [model(**inputs) for inputs in calls]
    kernl_warnings = [w for w in caught if str(w.message).startswith("kernl:")]
    assert len(kernl_warnings) == 1, [str(w.message) for w in caught]
    assert "cannot run through kernl" in str(kernl_warnings[0].message)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_optimize_twice_is_a_no_op():
    model = tiny_bert()
    forward = optimize_model(model).forward
    assert kernl.optimize_model(model).forward is forward


@pytest.mark.gpu
def test_inference_mode_and_autocast_fp16_on_cuda():
    model, reference = _twins(max_position_embeddings=128)
    model, reference = model.cuda(), reference.cuda()
    for batch, seq in [(2, 37), (5, 100), (2, 40)]:
        inputs = {k: v.cuda() for k, v in token_inputs(batch, seq).items()}
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            got = model(**inputs)
        with torch.no_grad():
            want = reference(**inputs)
        assert got.last_hidden_state.dtype == torch.float16
        cos = torch.nn.functional.cosine_similarity(
            got.last_hidden_state.float().flatten(), want.last_hidden_state.float().flatten(), dim=0
        )
        assert cos >= 0.999
    (programs,) = model.forward.programs.values()
    # One CUDA graph a bucket, replayed on the third call.
    assert set(programs[0].runner.graphs.entries) == {(2, 64), (8, 128)}
