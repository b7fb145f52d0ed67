"""The three tiny model families, each exported and rewritten once per test session."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tests.compiler.rewrite_utils import Rewritten, max_diff, rewrite_model
from tests.models import tiny_bert, tiny_gpt2, tiny_llama, token_inputs

BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


@dataclass
class Family:
    model: torch.nn.Module
    program: Rewritten
    max_diff: float  # rewritten program against the model on fresh inputs of another shape, fp32


def _build(name: str) -> Family:
    torch.manual_seed(0)
    model = BUILDERS[name]()
    program = rewrite_model(model, token_inputs(2, 8))
    fresh = token_inputs(2, 7)  # another seq length than the export's: the program is dynamic
    with torch.no_grad():
        want = model(**fresh).to_tuple()
    return Family(model, program, max_diff(program(**fresh), want))


@pytest.fixture(scope="session")
def families():
    """families(name) → Family, built on first use."""
    cache: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in cache:
            cache[name] = _build(name)
        return cache[name]

    return get
