"""Tensor parallel on GPUs through NCCL (a machine of 2 or more; NVLink multicast off): forward bundles and
generation at tp=2 (and tp=4 where there are 4 GPUs), each rank on its own GPU with the all-reduces and gathers
inside its CUDA graphs, give what the unsplit bundle gives on one GPU. fp32: sharding changes the order of the
row-parallel sums, which moves logits in the last bits only."""

from __future__ import annotations

import json

import pytest
import torch

import kernl
from kernl.compiler import shard_vocab
from tests.models import token_inputs
from tests.runtime.test_generation import tiny_lm
from tests.runtime.tp_launch import launch_ranks

pytestmark = pytest.mark.gpu
MAX_NEW = 8
SETTINGS = {"max_length": 32, "batch_sizes": [1, 2], "seq_lens": [8, 16]}
WORLDS = [w for w in (2, 4) if torch.cuda.is_available() and torch.cuda.device_count() >= w]


@pytest.fixture(autouse=True)
def no_multicast(monkeypatch):
    if not WORLDS:
        pytest.skip("needs 2 or more CUDA GPUs; runs on a multi-GPU machine through scripts/gpu-check")
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


@pytest.mark.parametrize("world", WORLDS)
def test_all_reduce_sums_on_every_rank_direct_and_in_graphs(world, tmp_path, monkeypatch):
    # Asked for, small sums take the one-shot path over NVLink (its setup must succeed on these GPUs), large ones NCCL.
    monkeypatch.setenv("KERNL_ALL_REDUCE", "one_shot")
    outs = launch_ranks(["--all-reduce", str(tmp_path)], tmp_path, world)
    assert json.loads(outs[0]["paths"]) == {"bfloat16": "one_shot", "float32": "one_shot"}
    for name in ("decode", "batch", "odd", "prefill"):
        for kind, given in (("direct", "input"), ("graph", "graph_input")):
            parts = [o[f"{name}/{given}"].float() for o in outs]
            want = sum(parts[1:], parts[0])
            got = outs[0][f"{name}/{kind}"]
            tol = 0 if got.dtype == torch.float32 and world == 2 else 2e-2  # bf16 rounds its sum once
            torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol, msg=f"{name} {kind}")
            assert all(torch.equal(got, o[f"{name}/{kind}"]) for o in outs[1:]), f"{name} {kind}: ranks differ"


def _summed_and_normed(parts: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor) -> tuple:
    total = sum(p.float() for p in parts).to(residual.dtype).float() + residual.float()
    y = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.float()
    return y, total


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("mode", ["--peer-norm", "--peer-linear-norm"])  # the partial rows given, or a GEMV's
def test_the_fused_sum_and_norm_is_the_same_on_every_rank_direct_and_in_graphs(mode, world, tmp_path, monkeypatch):
    monkeypatch.setenv("KERNL_ALL_REDUCE", "one_shot")
    outs = launch_ranks([mode, str(tmp_path)], tmp_path, world)
    assert [o["path"] for o in outs] == ["fused"] * world, "the kernel over peer memory did not set up on these GPUs"
    residual, weight = outs[0]["residual"], outs[0]["weight"]
    y, total = _summed_and_normed([o["direct/input"] for o in outs], residual, weight)
    torch.testing.assert_close(outs[0]["direct/total"].float(), total, atol=0, rtol=8e-3)  # one bf16 rounding
    torch.testing.assert_close(outs[0]["direct/y"].float(), y, atol=2e-2, rtol=2e-2)
    for replay in range(3):  # both halves of every slot, emptied and reused across replays
        residual_in = residual
        for i in range(3):
            key = f"graph{replay}/{i}"
            y, total = _summed_and_normed([o[f"{key}/input"] for o in outs], residual_in, weight)
            torch.testing.assert_close(outs[0][f"{key}/total"].float(), total, atol=0, rtol=8e-3, msg=key)
            torch.testing.assert_close(outs[0][f"{key}/y"].float(), y, atol=2e-2, rtol=2e-2, msg=key)
            residual_in = outs[0][f"{key}/total"]
    for key, value in outs[0].items():
        if key.endswith(("/y", "/total")):
            assert all(torch.equal(value, o[key]) for o in outs[1:]), f"{key}: ranks differ"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("path", ["auto", "nccl"])  # auto: the fused sum + norm over peer memory
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generation_on_ranks_equals_one_gpu(name, path, world, tmp_path, monkeypatch):
    monkeypatch.setenv("KERNL_ALL_REDUCE", path)
    # gpt2 with its tied embedding / LM head split by vocabulary (threshold lowered for a tiny model).
    model = tiny_lm(name, **({"n_head": 4, "vocab_size": 98} if name == "gpt2" else {"num_key_value_heads": 4}))
    model = model.cuda()
    monkeypatch.setattr(shard_vocab, "VOCAB_PARALLEL_MIN_BYTES", 0)
    one = kernl.load(kernl.compile(model, tmp_path / "tp1", buckets=[], generation=SETTINGS, device="cuda"))
    split = kernl.compile(model, tmp_path / "tp", buckets=[], generation=SETTINGS, device="cuda", tensor_parallel=world)
    ids = torch.randint(3, 98, (2, 11))
    want = one.generate(ids, max_new_tokens=MAX_NEW, eos_token_id=[])
    torch.save({"input_ids": ids, "max_new_tokens": MAX_NEW}, tmp_path / "prompts.pt")
    outs = launch_ranks(["--generate", str(split), str(tmp_path / "prompts.pt"), str(tmp_path)], tmp_path, world)
    for rank, out in enumerate(outs):
        assert torch.equal(out["0/greedy"], want), (rank, out["0/greedy"], want)
        assert torch.equal(out["0/stream"], want[:, ids.shape[1] :]), rank
    for kind in ("seeded", "unseeded"):  # sampling decided once for all ranks
        assert all(torch.equal(outs[0][f"0/{kind}"], o[f"0/{kind}"]) for o in outs[1:]), kind


@pytest.mark.parametrize("world", WORLDS)
def test_forward_bundle_on_ranks_equals_the_model(world, tmp_path):
    model = tiny_lm("llama", num_key_value_heads=4).cuda()
    path = kernl.compile(model, tmp_path / "tp", buckets=[(2, 16)], device="cuda", tensor_parallel=world)
    inputs = token_inputs(2, 9)
    torch.save(inputs, tmp_path / "inputs.pt")
    outs = launch_ranks(["--bundle", str(path), str(tmp_path / "inputs.pt"), str(tmp_path)], tmp_path, world)
    with torch.no_grad():
        want = model(**{k: v.cuda() for k, v in inputs.items()}).logits.cpu()
    for out in outs:
        torch.testing.assert_close(out["logits"], want, atol=2e-4, rtol=0)
    assert all(torch.equal(outs[0]["logits"], o["logits"]) for o in outs[1:])
