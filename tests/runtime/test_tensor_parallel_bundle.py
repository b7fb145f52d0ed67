"""kernl.compile(..., tensor_parallel=2) writes one program and a weights file per rank; kernl.load under
torchrun's environment runs it in 2 gloo processes, and every rank returns the model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import kernl
from kernl.errors import BundleError
from tests.models import token_inputs
from tests.runtime.tp_launch import launch_ranks


@pytest.fixture(scope="module")
def tp_bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    ).eval()
    path = kernl.compile(model, tmp_path_factory.mktemp("tp") / "gpt2", buckets=[(2, 16)], device="cpu",
                         tensor_parallel=2)  # fmt: skip
    return model, path


def test_bundle_holds_a_weights_file_per_rank(tp_bundle):
    _, path = tp_bundle
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["tensor_parallel"]["world_size"] == 2
    assert manifest["weights"]["ranks"] == ["weights.rank0.safetensors", "weights.rank1.safetensors"]
    assert manifest["rewrites"]["tp_all_reduce"] == 4 and manifest["rewrites"]["tp_attention"] == 2
    (check,) = manifest["checks"]  # the ranks, as threads at compile time, against the eager model
    assert check["max_abs_diff"] < 1e-4 and check["ranks_max_abs_diff"] == 0.0
    assert "kernl.all_reduce" in (path / "program.json").read_text()


def test_every_rank_returns_the_models_logits(tp_bundle, tmp_path):
    model, path = tp_bundle
    inputs = token_inputs(2, 9)
    torch.save(inputs, tmp_path / "inputs.pt")
    outs = launch_ranks(["--bundle", str(path), str(tmp_path / "inputs.pt"), str(tmp_path)], tmp_path, 2)
    with torch.no_grad():
        want = model(**inputs).logits
    for out in outs:
        assert (out["logits"] - want).abs().max() < 1e-4
    assert torch.equal(outs[0]["logits"], outs[1]["logits"])


def test_a_single_process_or_another_world_size_is_refused(tp_bundle, monkeypatch):
    _, path = tp_bundle
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(BundleError, match="torchrun --nproc-per-node 2"):
        kernl.load(path)
    with pytest.raises(BundleError, match="compiled for 2 rank.*world_size=4"):
        kernl.load(path, rank=0, world_size=4)
