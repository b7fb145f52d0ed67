"""Tensor parallel on CPU: two gloo processes each run their shard of one program, bound from data as a bundle
is, and every rank's logits equal the unsharded program's."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from kernl.compiler.warmup_sharded import warm_up_sharded
from kernl.errors import BundleError
from kernl.runtime.runner import Runner
from kernl.runtime.tensor_parallel import Placement, place
from tests.compiler.shard_utils import lower_sharded
from tests.models import token_inputs
from tests.runtime.tp_launch import launch_ranks

WORLD = 2
BUCKET = (2, 16)

MODELS = {
    # Grouped-query attention: 4 query heads over 2 key/value heads, so 2 query heads and 1 kv head per rank.
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(
            vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=96, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
        )
    ),
    # Conv1D weights read transposed, fused c_attn split in three, biases on every linear, tied LM head.
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    ),
}  # fmt: skip


def _run(low, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    specs = [(s["name"], getattr(torch, s["dtype"])) for s in low.spec.inputs]
    runner = Runner(low.bind(), low.weight_list(), specs, low.spec.outputs, low.device, graphs=False)
    return runner(BUCKET, inputs)[0]


def test_ranks_match_the_unsharded_program(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the kernels' torch references, as in the ranks
    case_dir = tmp_path / "cases"
    case_dir.mkdir()
    want = {}
    for name, build in MODELS.items():
        torch.manual_seed(0)
        model = build().eval()
        whole, low, plan = lower_sharded(model, [BUCKET], WORLD)
        assert plan.report["tp_attention"] == 2 and plan.report["tp_all_reduce"] == 4  # 2 layers: attention, MLP
        assert not any("lm_head" in w or "wte" in w for w in plan.rules)  # the LM head is replicated
        # program.py, the readable view, shows the sums (fused with the norm and the linear before it, or not)
        sums = ("all_reduce", "all_reduce_add_rms_norm", "linear_all_reduce_add_rms_norm")
        assert any(f"kernl_ops.{op}(" in low.source for op in sums)
        inputs = token_inputs(2, 11)  # fewer than the bucket: padded, run, sliced back, as a bundle does
        want[name] = _run(whole, inputs)
        with torch.no_grad():
            hf = model(**inputs).logits
        assert (want[name] - hf).abs().max() < 1e-4
        # kernl.compile's check of a sharded program: its ranks as threads, against the eager model.
        (check,) = warm_up_sharded(
            low.bind(), plan, low.weights, low.spec.weights, model, low.make_inputs, [BUCKET], low.device,
            low.input_names,
        )  # fmt: skip
        assert check["max_abs_diff"] < 1e-4 and check["ranks_max_abs_diff"] == 0.0
        case = {
            "program": json.dumps(low.spec.data(), allow_nan=False),
            "manifest": json.dumps(low.spec.manifest_entries()),
            "bucket": list(BUCKET),
            **{f"input.{k}": v for k, v in inputs.items()},
            **{f"rank{r}": plan.weights_for(low.weights, r) for r in range(WORLD)},
        }
        torch.save(case, case_dir / name)

    outs = launch_ranks([str(case_dir), str(tmp_path)], tmp_path, WORLD)
    for rank, got in enumerate(outs):
        assert torch.equal(got["all_reduce"], torch.arange(6, dtype=torch.float32) * sum(range(1, WORLD + 1)))
        assert got["weights_file"] == f"weights.rank{rank}.safetensors"
        assert "loaded another bundle" in got["another_bundle"]  # on every rank, not only the odd one
        # The rank whose file is corrupt says so; the others say which rank failed, instead of waiting for it.
        want_error = (
            "its file is corrupt" if rank == 1 else "tensor parallel: rank 1 failed to load: its file is corrupt"
        )
        assert got["one_rank_failed"] == want_error
        for name, logits in want.items():
            out = got[f"{name}/logits"]
            assert out.shape == logits.shape
            assert (out - logits).abs().max() < 1e-4, f"{name}, rank {rank}"
    for name in want:  # the sums are the same bytes on every rank, and so is all that follows them
        assert all(torch.equal(o[f"{name}/logits"], outs[0][f"{name}/logits"]) for o in outs)


def _manifest(world_size: int) -> dict:
    files = [f"weights.rank{r}.safetensors" for r in range(world_size)]
    return {"tensor_parallel": {"world_size": world_size}, "weights": {"file": files[0], "ranks": files}}


def test_loads_that_cannot_be_placed_are_refused(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cpu = torch.device("cpu")
    with pytest.raises(BundleError, match="torchrun --nproc-per-node 2"):
        place(_manifest(2), cpu)  # no process group and no launcher: refused, nothing waits
    with pytest.raises(BundleError, match="compiled for 2 rank.*world_size=3"):
        place(_manifest(2), cpu, rank=0, world_size=3)
    with pytest.raises(BundleError, match="compiled for 1 rank.*world_size=2"):
        place({"weights": {"file": "weights.safetensors"}}, cpu, world_size=2)
    assert place({"weights": {"file": "weights.safetensors"}}, cpu) == Placement(0, 1, cpu, None)
    broken = _manifest(2)
    broken["weights"]["ranks"].pop()
    with pytest.raises(BundleError, match="one weights file per rank"):
        place(broken, cpu)
