"""Concurrent calls on the CPU path return each caller's own result."""

from concurrent.futures import ThreadPoolExecutor

import torch

import kernl
from tests.models import token_inputs


def test_threads_get_their_own_results(tiny_bert_bundle):
    model, path = tiny_bert_bundle
    bundle = kernl.load(path)
    calls = [token_inputs(b, s) for b, s in [(1, 5), (4, 30), (2, 16), (3, 9)] * 2]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: bundle(**c).last_hidden_state, calls))
    with torch.no_grad():
        for inputs, out in zip(calls, got):
            assert (out - model(**inputs).last_hidden_state).abs().max() <= 1e-4
