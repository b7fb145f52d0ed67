"""Forward bundles split over 2 ranks: a vocabulary-parallel embedding and LM head (ranks as threads, against the
eager model), and a bundle compiled from a model on the meta device and its sharded checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import kernl
from kernl.compiler import shard_vocab
from kernl.compiler.warmup_sharded import warm_up_sharded
from tests.compiler.shard_utils import lower_sharded
from tests.runtime.test_tensor_parallel import BUCKET, MODELS

pytestmark = pytest.mark.usefixtures("cpu_references")


def even_vocab(name: str) -> torch.nn.Module:
    """test_tensor_parallel's model with 98 tokens: a vocabulary that splits over 2 ranks."""
    config = MODELS[name]().config
    config.vocab_size = 98
    return type(MODELS[name]())(config).eval()


@pytest.mark.parametrize("split_embedding", [True, False], ids=["embedding-split", "embedding-whole"])
def test_vocabulary_parallel_ranks_match_the_model(split_embedding, monkeypatch):
    """Llama's untied table: the LM head split by vocabulary, its embedding whole by default (a lookup reads one
    row) or split as well (the masked lookup and its sum); gpt2's tied table: test_tensor_parallel_generation."""
    monkeypatch.setattr(shard_vocab, "VOCAB_PARALLEL_MIN_BYTES", 0)  # any table qualifies
    monkeypatch.setattr(shard_vocab, "SPLIT_UNTIED_EMBEDDING", split_embedding)
    model = even_vocab("llama")
    _, low, plan = lower_sharded(model, [BUCKET], 2)
    assert bool(plan.vocab["embedding"]) is split_embedding and plan.vocab["lm_head"]
    assert plan.describe()["vocab_parallel"]["min_bytes"] == 0
    assert "kernl_ops.all_gather(" in low.source
    ranks = [plan.weights_for(low.weights, r) for r in range(2)]
    for table in {*plan.vocab["embedding"], *plan.vocab["lm_head"]}:
        assert ranks[0][table].shape[0] * 2 == low.weights[table].shape[0]
        assert torch.equal(torch.cat([r[table] for r in ranks]), low.weights[table])
    embedding = next(n for n in low.weights if "embed_tokens" in n)
    if not split_embedding:
        assert all(torch.equal(r[embedding], low.weights[embedding]) for r in ranks)  # every rank: the whole table
    (check,) = warm_up_sharded(
        low.bind(), plan, low.weights, low.spec.weights, model, low.make_inputs, [BUCKET], low.device,
        low.input_names,
    )  # fmt: skip
    assert check["max_abs_diff"] < 1e-4 and check["ranks_max_abs_diff"] == 0.0
    # Split, the manifest declares the table's rows, as the runtime cannot find them through the shift and mask.
    assert plan.id_limit() == (98 if split_embedding else None)


def test_forward_bundle_from_meta_and_checkpoint(tmp_path):
    model = MODELS["gpt2"]().eval()
    model.save_pretrained(tmp_path / "ckpt", safe_serialization=True, max_shard_size="20KB")
    with torch.device("meta"):
        empty = type(model)(model.config)
    real = kernl.compile(model, tmp_path / "real", buckets=[BUCKET], device="cpu", tensor_parallel=2)
    meta = kernl.compile(empty, tmp_path / "meta", buckets=[BUCKET], device="cpu", tensor_parallel=2,
                         weights_from=tmp_path / "ckpt")  # fmt: skip
    for rank in range(2):
        want, got = (load_file(p / f"weights.rank{rank}.safetensors") for p in (real, meta))
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    (check,) = json.loads((meta / "manifest.json").read_text())["checks"]
    assert check["eager"].startswith("skipped")
