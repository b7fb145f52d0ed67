"""GPT-2 and Llama through the whole pipeline: kernl.compile → bundle → kernl.load, on CPU and on CUDA."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernl
from tests.compiler.rewrite_utils import INCIDENTAL_COUNTERS, expected_rewrites
from tests.models import tiny_bert, tiny_gpt2, tiny_llama, token_inputs

BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}

RUN_BUNDLE = """
import sys, torch, kernl
bundle = kernl.load(sys.argv[1], device="cpu")
out = bundle(**torch.load(sys.argv[2]))
torch.save({k: v.cpu() for k, v in out.items()}, sys.argv[3])
"""

# Kernel programs the bundle of each family must call.
KERNELS = {
    "gpt2": ("attention", "linear", "add_layer_norm"),
    "llama": ("attention", "rotary", "gated_linear", "add_rms_norm", "linear"),
}


def _kernel_rewrites(report: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in report.items() if k not in INCIDENTAL_COUNTERS}


def _manifest_rewrites(bundle: Path) -> dict[str, int]:
    return _kernel_rewrites(json.loads((bundle / "manifest.json").read_text())["rewrites"])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_round_trip_cpu(tmp_path, name):
    model = BUILDERS[name]()
    bundle = kernl.compile(model, tmp_path / "bundle", buckets=[(2, 16)], device="cpu")
    assert _manifest_rewrites(bundle) == expected_rewrites(name, model.config)
    program = (bundle / "program.py").read_text()
    assert all(f"kernl_ops.{k}(" in program for k in KERNELS[name])
    inputs = token_inputs(2, 11)  # padded to the 2x16 bucket by the runtime
    torch.save(inputs, tmp_path / "inputs.pt")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-c", RUN_BUNDLE, str(bundle), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")]
    subprocess.run(cmd, check=True, env=env, timeout=300)
    got = torch.load(tmp_path / "out.pt")["last_hidden_state"]
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
    assert got.shape == want.shape == (2, 11, model.config.hidden_size)
    assert (got - want).abs().max() <= 1e-4


# Slack on top of twice HF's own error: a few units in the last place at the outputs' magnitude (~1-4).
EPS = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_cuda_accuracy(tmp_path, name, dtype):
    model = BUILDERS[name]().cuda()
    model.config.use_cache = False
    inputs = {k: v.cuda() for k, v in token_inputs(2, 13).items()}
    with torch.no_grad():
        ref = model(**inputs)  # fp32: the reference
        hf = copy.deepcopy(model).to(dtype)(**inputs)  # HF itself in the low dtype
    bundle = kernl.compile(model, tmp_path / "bundle", buckets=[(2, 16)], device="cuda", dtype=dtype)
    assert _manifest_rewrites(bundle) == expected_rewrites(name, model.config)
    out = kernl.load(bundle, device="cuda")(**inputs)
    for key, value in out.items():
        got, want, theirs = value.float(), ref[key].float(), hf[key].float()
        cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
        err, hf_err = (got - want).abs().max().item(), (theirs - want).abs().max().item()
        assert cos >= 0.999, f"{key}: cosine {cos:.5f}"
        assert err <= 2 * hf_err + EPS[dtype], f"{key}: kernl error {err:.2e}, HF's own {hf_err:.2e}"
