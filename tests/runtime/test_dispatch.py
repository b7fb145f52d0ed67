"""Calls: padding to the smallest covering bucket, output fields, and clear errors for bad inputs."""

import pytest
import torch

import kernl
from tests.models import token_inputs


@pytest.fixture(scope="module")
def loaded(tiny_bert_bundle):
    model, path = tiny_bert_bundle
    return model, kernl.load(path)


@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 16), (3, 7), (4, 32), (1, 17)])
def test_padded_calls_match_the_model(loaded, batch, seq):
    model, bundle = loaded
    inputs = token_inputs(batch, seq)
    out = bundle(**inputs)
    with torch.no_grad():
        want = model(**inputs)
    assert out.last_hidden_state.shape == (batch, seq, 32)
    assert out["pooler_output"].shape == (batch, 32)
    assert torch.isfinite(out[0]).all()
    assert (out.last_hidden_state - want.last_hidden_state).abs().max() <= 1e-4
    assert (out.pooler_output - want.pooler_output).abs().max() <= 1e-4


def test_omitted_mask_means_all_visible(loaded):
    model, bundle = loaded
    ids = torch.randint(0, 99, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
    assert (bundle(input_ids=ids).last_hidden_state - want).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "inputs, match",
    [
        (dict(input_ids=torch.randint(0, 9, (2, 8)), labels=torch.zeros(2)), "^labels: not an input"),
        (dict(attention_mask=torch.ones(2, 8, dtype=torch.long)), "^input_ids: missing"),
        (dict(input_ids=torch.rand(2, 8)), "^input_ids: dtype"),
        (dict(input_ids=torch.randint(0, 9, (8,))), r"^input_ids: expected a \[batch, seq\]"),
        (dict(input_ids=torch.randint(0, 9, (2, 33))), r"^input_ids: .*exceeds every bucket \(buckets: 2x16, 4x32\)"),
        (dict(input_ids=torch.randint(0, 9, (5, 4))), "exceeds every bucket"),
        (
            dict(input_ids=torch.randint(0, 9, (2, 8)), attention_mask=torch.ones(2, 9, dtype=torch.long)),
            "^attention_mask: shape",
        ),
    ],
)
def test_bad_calls_raise_input_error(loaded, inputs, match):
    with pytest.raises(kernl.InputError, match=match):
        loaded[1](**inputs)


def test_input_error_is_a_value_error():
    assert issubclass(kernl.InputError, ValueError) and issubclass(kernl.InputError, kernl.KernlError)


def test_fill_inputs_copies_exact_fits_and_pads_the_rest():
    from kernl.runtime.dispatch import fill_inputs

    ids, mask = torch.randint(0, 1000, (2, 5)), torch.randint(0, 2, (2, 5))
    exact = [torch.full((2, 5), -1), torch.full((2, 5), -1)]
    fill_inputs(exact, [ids, mask], ["input_ids", "attention_mask"])
    assert torch.equal(exact[0], ids) and torch.equal(exact[1], mask)

    padded = [torch.full((3, 8), -1), torch.full((3, 8), -1)]
    fill_inputs(padded, [ids, mask], ["input_ids", "attention_mask"])
    assert torch.equal(padded[0][:2, :5], ids) and torch.equal(padded[1][:2, :5], mask)
    assert padded[0][2:].eq(0).all() and padded[0][:, 5:].eq(0).all()
    assert padded[1][2, 0] == 1 and padded[1][2, 1:].eq(0).all()  # a padded row keeps one visible position
