"""Generation bundles split over 2 ranks (gloo, CPU): the KV cache holds each rank's heads only, and every rank
generates transformers' tokens (greedy; the unsplit bundle's equality to transformers is test_generation's), and
the same tokens as the other rank when sampling, with a seed and without one (rank 0's is shared).

GPT-2's tied embedding and LM head are split by vocabulary here (the size threshold lowered for a tiny model). The
same bundles compiled from a model on the meta device and its sharded safetensors checkpoint hold the same weights
and generate the same tokens.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import kernl
from kernl.compiler import shard_vocab
from kernl.kernels.collectives import ThreadRanks
from tests.runtime.test_generation import hf_greedy, tiny_lm
from tests.runtime.tp_launch import launch_ranks

pytestmark = pytest.mark.usefixtures("cpu_references")

MAX_NEW = 6
SETTINGS = {"max_length": 32, "batch_sizes": [2], "seq_lens": [8]}
# llama: grouped-query attention, 4 query heads over 2 kv heads (1 kv head per rank), vocabulary kept whole.
# gpt2: fused c_attn, biases, and its tied embedding / LM head split by vocabulary (any size qualifies).
MODELS = {"llama": ({}, None), "gpt2": ({"n_head": 4, "vocab_size": 98}, 0)}
SAMPLE = dict(do_sample=True, temperature=1.5, top_k=0, top_p=1.0)
THREAD_RANKS_SEEN: list[tuple[int, int]] = []  # (threads, ranks they stand for) of every ThreadRanks the compiles made


@pytest.fixture(scope="module")
def tp_gen(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tpgen")
    built = {}
    for name, (overrides, vocab_bytes) in MODELS.items():
        model = tiny_lm(name, **overrides)
        with pytest.MonkeyPatch.context() as patch:
            if vocab_bytes is not None:
                patch.setattr(shard_vocab, "VOCAB_PARALLEL_MIN_BYTES", vocab_bytes)
            real_init = ThreadRanks.__init__

            def recording_init(self, *args, real_init=real_init, **kwargs):
                real_init(self, *args, **kwargs)
                THREAD_RANKS_SEEN.append((self.world_size, self.stands_for))

            patch.setattr(ThreadRanks, "__init__", recording_init)
            tp = kernl.compile(model, root / name, buckets=[], generation=SETTINGS, device="cpu", tensor_parallel=2)
        meta = None
        if name == "llama":  # (the forward path from meta, with GPT-2's tied weights: test_tensor_parallel_vocab)
            # The checkpoint in small shards; the model built again on meta (no weights), compiled from those files.
            model.save_pretrained(root / f"{name}_ckpt", safe_serialization=True, max_shard_size="20KB")
            with torch.device("meta"):
                empty = type(model)(model.config)
            meta = kernl.compile(empty, root / f"{name}_meta", buckets=[], generation=SETTINGS, device="cpu",
                                 tensor_parallel=2, weights_from=root / f"{name}_ckpt")  # fmt: skip
        built[name] = (model, tp, meta)
    return built


def test_rank_0_compiling_alone_stands_for_both_ranks(tp_gen):
    """The compile's lone rank 0 compiles kernels specialised on the world size (the fused sum + norm's tile of
    places) for the program's 2 ranks, so that the bundle ships what its ranks launch."""
    assert tp_gen
    assert (1, 2) in THREAD_RANKS_SEEN and (2, 2) in THREAD_RANKS_SEEN and (1, 1) not in THREAD_RANKS_SEEN


@pytest.mark.parametrize("name", MODELS)
def test_each_rank_caches_its_own_heads(tp_gen, name):
    model, tp, _ = tp_gen[name]
    manifest = json.loads((tp / "manifest.json").read_text())
    assert manifest["tensor_parallel"]["world_size"] == 2
    assert manifest["weights"]["ranks"] == ["weights.rank0.safetensors", "weights.rank1.safetensors"]
    cache, config = manifest["generation"]["cache"], model.config
    heads_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    assert cache["heads_kv"] * 2 == heads_kv
    assert all(s["shape"][1] == cache["heads_kv"] for s in manifest["program"]["state"])
    assert cache["bytes"] == sum(torch.Size(s["shape"]).numel() * 4 for s in manifest["program"]["state"])
    for check in manifest["checks"]:  # prefill and decode, ranks as threads, against the eager model
        assert check["max_abs_diff"] < 1e-4 and check["ranks_max_abs_diff"] == 0.0


def test_a_large_vocabulary_is_split_across_ranks(tp_gen):
    _, tp, _ = tp_gen["gpt2"]
    manifest = json.loads((tp / "manifest.json").read_text())
    vocab = manifest["tensor_parallel"]["vocab_parallel"]
    assert vocab["embedding"] == vocab["lm_head"] == ["p_transformer_wte_weight"]  # tied: split for both
    assert manifest["rewrites"]["tp_vocab_lm_head"] == 1 and "kernl.all_gather" in (tp / "program.json").read_text()
    (offset,) = vocab["offsets"]
    for rank in range(2):
        weights = load_file(tp / f"weights.rank{rank}.safetensors")
        assert weights["p_transformer_wte_weight"].shape[0] == 49 and weights[offset].item() == 49 * rank
    llama = json.loads((tp_gen["llama"][1] / "manifest.json").read_text())["tensor_parallel"]["vocab_parallel"]
    assert llama["embedding"] == llama["lm_head"] == []  # 99 x 64 fp32, under the default threshold


def test_ranks_generate_transformers_tokens(tp_gen, tmp_path):
    ids = torch.randint(3, 98, (2, 7))
    torch.save({"input_ids": ids, "max_new_tokens": MAX_NEW}, tmp_path / "prompts.pt")
    bundles = [str(tp) for _, tp, _ in tp_gen.values()] + [str(tp_gen["llama"][2])]
    outs = launch_ranks(["--generate", ",".join(bundles), str(tmp_path / "prompts.pt"), str(tmp_path)], tmp_path, 2)
    for i, (name, (model, _, _)) in enumerate(tp_gen.items()):
        want = hf_greedy(model, ids.tolist(), max_new_tokens=MAX_NEW)
        for out in outs:
            assert torch.equal(out[f"{i}/greedy"], want), name
            assert torch.equal(out[f"{i}/stream"], want[:, ids.shape[1] :]), name
            if name == "llama":  # compiled from meta and its checkpoint
                assert torch.equal(out[f"{len(tp_gen)}/greedy"], want)
        for kind in ("seeded", "unseeded"):
            assert torch.equal(outs[0][f"{i}/{kind}"], outs[1][f"{i}/{kind}"]), (name, kind)
        assert not torch.equal(outs[0][f"{i}/seeded"], outs[0][f"{i}/unseeded"])  # a fresh seed was drawn


def test_compiled_from_meta_and_checkpoint_holds_the_same_weights(tp_gen):
    _, tp, meta = tp_gen["llama"]
    for rank in range(2):
        want, got = (load_file(p / f"weights.rank{rank}.safetensors") for p in (tp, meta))
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
    manifest = json.loads((meta / "manifest.json").read_text())
    assert manifest["tensor_parallel"] == json.loads((tp / "manifest.json").read_text())["tensor_parallel"]
    assert all(c["eager"].startswith("skipped") for c in manifest["checks"])  # no eager model to compare with


def test_a_meta_model_needs_its_weights(tmp_path):
    with torch.device("meta"):
        empty = tiny_lm("llama")
    with pytest.raises(kernl.KernlError, match="weights_from"):
        kernl.compile(empty, tmp_path / "b", buckets=[], generation=SETTINGS, device="cpu", tensor_parallel=2)
    with pytest.raises(kernl.KernlError, match="weights_from: only for a model built on the meta device"):
        kernl.compile(tiny_lm("llama"), tmp_path / "c", buckets=[], generation=SETTINGS, weights_from=tmp_path)


def test_serving_ranks_follow_rank_0(tp_gen):
    """kernl serve --tensor-parallel: this process is rank 0 and serves through its Mirror; rank 1, started here,
    makes every call too (else the all-reduces would never meet and this would hang)."""
    from kernl.serve.tensor_parallel import serve_tensor_parallel

    model, tp, _ = tp_gen["llama"]
    ids = torch.randint(3, 98, (1, 5))
    got = {}

    def serve(bundle) -> None:
        assert bundle.manifest["tensor_parallel"]["world_size"] == 2
        got["greedy"] = bundle.generate(ids, max_new_tokens=4, eos_token_id=[])
        got["stream"] = torch.stack(list(bundle.stream(ids, max_new_tokens=4, eos_token_id=[])), dim=1)
        got["sampled"] = [bundle.generate(ids, max_new_tokens=4, eos_token_id=[], **SAMPLE) for _ in range(2)]
        with pytest.raises(kernl.InputError):  # refused on every rank; rank 1 goes on to the next call
            bundle.generate(ids, max_new_tokens=99)
        got["after"] = bundle.generate(ids, max_new_tokens=2, eos_token_id=[])

    serve_tensor_parallel(tp, 2, serve, device="cpu")
    want = hf_greedy(model, ids.tolist(), max_new_tokens=4)
    assert torch.equal(got["greedy"], want) and torch.equal(got["stream"], want[:, 5:])
    assert torch.equal(got["after"], want[:, :7])
