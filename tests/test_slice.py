"""The thin slice: a tiny BERT compiled to a bundle, loaded and run in a fresh Python process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernl
from tests.models import tiny_bert, token_inputs

RUN_BUNDLE = """
import sys, torch, kernl
bundle = kernl.load(sys.argv[1], device=sys.argv[2])
inputs = torch.load(sys.argv[3])
out = bundle(**inputs)
assert "transformers" not in sys.modules, "the runtime imported transformers"
# torch._dynamo costs seconds to import: the runtime must not pull it in (custom-op dispatch would).
assert "torch._dynamo" not in sys.modules, "the runtime imported torch._dynamo"
torch.save({k: v.cpu() for k, v in out.items()}, sys.argv[4])
"""


def _run_in_fresh_process(bundle: Path, device: str, inputs: dict, tmp_path: Path) -> dict:
    torch.save(inputs, tmp_path / "inputs.pt")
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    subprocess.run(
        [sys.executable, "-c", RUN_BUNDLE, str(bundle), device, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        check=True,
        env=env,
        timeout=300,
    )
    return torch.load(tmp_path / "out.pt")


def _round_trip(tmp_path: Path, device: str, dtype: torch.dtype):
    model = tiny_bert()
    bundle = kernl.compile(model, tmp_path / "bundle", buckets=[(4, 32)], device=device, dtype=dtype)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {"manifest.json", "weights.safetensors", "program.py"} <= {p.name for p in bundle.iterdir()}
    assert manifest["rewrites"]["add_layer_norm"] == 2 * model.config.num_hidden_layers  # two post-norms a layer
    assert "kernl_ops.add_layer_norm(" in (bundle / "program.py").read_text()
    inputs = token_inputs(3, 19)  # odd shape: padded to the 4x32 bucket
    out = _run_in_fresh_process(bundle, device, inputs, tmp_path)
    ref_model = model.to(device=device, dtype=dtype)
    with torch.no_grad():
        want = ref_model(**{k: v.to(device) for k, v in inputs.items()})
    return out, want


def test_round_trip_cpu(tmp_path):
    out, want = _round_trip(tmp_path, "cpu", torch.float32)
    assert out["last_hidden_state"].shape == (3, 19, 32)
    assert (out["last_hidden_state"] - want.last_hidden_state).abs().max() <= 1e-4
    assert (out["pooler_output"] - want.pooler_output).abs().max() <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_cuda(tmp_path, dtype):
    out, want = _round_trip(tmp_path, "cuda", dtype)
    got, ref = out["last_hidden_state"].float(), want.last_hidden_state.float().cpu()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert cos >= 0.999
    assert (got - ref).abs().max() <= 0.05
