"""The program merges attention heads without a copy: attention's output is stored [batch, seq, heads, dim]."""

import collections

from torch.utils._python_dispatch import TorchDispatchMode

import kernl
from tests.models import token_inputs


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_no_copy_when_merging_heads(tiny_bert_bundle):
    _, path = tiny_bert_bundle
    bundle = kernl.load(path)
    inputs = token_inputs(2, 16)  # the 2x16 bucket exactly: no padding
    with _CountOps() as counted:
        out = bundle(**inputs)
    assert out.last_hidden_state.shape == (2, 16, 32)
    # A reshape that cannot be a view runs clone + _unsafe_view; the two layers merge heads with views only.
    assert counted.ops["aten.clone.default"] == 0, counted.ops
    assert counted.ops["aten._unsafe_view.default"] == 0, counted.ops
