"""Fixtures of the kernel tests."""

import pytest
import torch

from kernl.kernels import autotune_cache


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled float tensors: an output element the kernel skips shows up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture
def fresh_autotune():
    """An empty decision cache for the test, the previous one restored after."""
    saved = autotune_cache.export()
    autotune_cache.clear()
    yield
    autotune_cache.clear()
    autotune_cache.load(saved)
    autotune_cache.set_frozen(False)
