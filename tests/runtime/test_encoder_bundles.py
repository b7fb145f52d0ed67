"""Encoder bundles of the encoder-decoder families: T5's encoder (relative position bias, padded calls into a bigger
bucket) and Whisper's (log-mel features of a fixed window, batch-only buckets), against eager on fresh inputs."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import kernl
from kernl.errors import InputError, KernlError
from tests.encoder_models import t5_inputs, tiny_t5_encoder, tiny_whisper_encoder

pytestmark = pytest.mark.usefixtures("cpu_references")

FP32_TOL = 2e-5


def _diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want.float()).abs().max().item()


@pytest.fixture(scope="module")
def t5_bundle(tmp_path_factory):
    """A relu T5 encoder (sdpa) compiled for one (4, 32) bucket: every smaller call is padded into it."""
    torch.manual_seed(0)
    model = tiny_t5_encoder()
    path = kernl.compile(model, tmp_path_factory.mktemp("t5") / "bundle", buckets=[(4, 32)], device="cpu")
    return model, path


def test_t5_padded_calls_match_eager(t5_bundle):
    """Calls of several batch/seq sizes padded into the one bucket: the padded rows and positions (token 0, mask 0,
    a padded row's first position visible) must neither index out of range nor change the real rows."""
    model, path = t5_bundle
    bundle = kernl.load(path, device="cpu")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["rewrites"]["attention"] == model.config.num_layers
    assert manifest["rewrites"]["inplace_functionalized"] >= 1  # T5's `relative_buckets +=`
    for batch, seq in [(3, 7), (1, 32), (4, 32), (2, 19), (1, 1)]:
        inputs = t5_inputs(batch, seq)
        with torch.no_grad():
            want = model(**inputs).last_hidden_state
        got = bundle(**inputs).last_hidden_state
        assert got.shape == want.shape
        assert _diff(got, want) < FP32_TOL, (batch, seq)


def test_t5_bundle_in_a_fresh_process(t5_bundle, tmp_path):
    model, path = t5_bundle
    inputs = t5_inputs(2, 9)
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
    torch.save({"inputs": inputs, "want": want}, tmp_path / "case.pt")
    script = textwrap.dedent(
        f"""
        import os
        os.environ["TRITON_INTERPRET"] = "0"
        import torch, kernl
        case = torch.load({str(tmp_path / "case.pt")!r})
        got = kernl.load({str(path)!r}, device="cpu")(**case["inputs"]).last_hidden_state
        print((got - case["want"]).abs().max().item())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) < FP32_TOL


def test_t5_v1_1_eager_bundle(tmp_path):
    """T5 v1.1 geometry written with eager attention: gated GELU, the eager attention pass, padded calls."""
    model = tiny_t5_encoder(feed_forward_proj="gated-gelu", attn_implementation="eager")
    path = kernl.compile(model, tmp_path / "bundle", buckets=[(4, 16)], device="cpu")
    manifest = json.loads((path / "manifest.json").read_text())
    layers = model.config.num_layers
    assert manifest["rewrites"]["eager_attention"] == layers
    assert manifest["rewrites"]["gated_linear"] == layers
    assert "softmax" not in (path / "program.py").read_text()
    bundle = kernl.load(path, device="cpu")
    for batch, seq in [(1, 3), (2, 8), (3, 11), (4, 16)]:
        inputs = t5_inputs(batch, seq)
        with torch.no_grad():
            want = model(**inputs).last_hidden_state
        assert _diff(bundle(**inputs).last_hidden_state, want) < FP32_TOL, (batch, seq)


@pytest.fixture(scope="module")
def whisper_bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_whisper_encoder()
    path = kernl.compile(model, tmp_path_factory.mktemp("whisper") / "bundle", buckets=[(1, 48), (3, 48)], device="cpu")
    return model, path


def test_whisper_manifest(whisper_bundle):
    model, path = whisper_bundle
    manifest = json.loads((path / "manifest.json").read_text())
    (spec,) = manifest["inputs"]
    assert spec["name"] == "input_features" and spec["dims"] == ["batch", 12, 48] and spec["rank"] == 3
    assert manifest["outputs"][0]["dims"][0] == "batch" and manifest["outputs"][0]["dims"][1:] == [24, 32]
    layers = model.config.encoder_layers
    rewrites = manifest["rewrites"]
    assert rewrites["attention"] == layers
    assert rewrites["add_layer_norm"] + rewrites.get("layer_norm", 0) == 2 * layers + 1
    assert rewrites["linear_activation"] == layers  # fc1 with its GELU
    program = (path / "program.py").read_text()
    assert "aten.conv1d" in program and "scaled_dot_product_attention" not in program
    assert all(c["max_abs_diff"] < FP32_TOL for c in manifest["checks"])


def test_whisper_calls_match_eager(whisper_bundle):
    model, path = whisper_bundle
    bundle = kernl.load(path, device="cpu")
    for batch in (1, 2, 3):
        features = torch.randn(batch, 12, 48)
        with torch.no_grad():
            want = model(input_features=features).last_hidden_state
        got = bundle(input_features=features).last_hidden_state
        assert got.shape == want.shape
        assert _diff(got, want) < FP32_TOL, batch


@pytest.mark.parametrize("shape", [(2, 12, 47), (2, 11, 48), (2, 12), (4, 12, 48)])
def test_whisper_wrong_features_are_input_errors(whisper_bundle, shape):
    _, path = whisper_bundle
    bundle = kernl.load(path, device="cpu")
    with pytest.raises(InputError, match="input_features"):
        bundle(input_features=torch.randn(*shape))


def test_whisper_bucket_must_be_its_window(tmp_path):
    with pytest.raises(KernlError, match=r"\(batch, 48\)"):
        kernl.compile(tiny_whisper_encoder(), tmp_path / "bundle", buckets=[(2, 16)], device="cpu")


@pytest.mark.gpu
def test_t5_small_padded_into_bucket_on_cuda(tmp_path):
    """The reported case: a t5-small-geometry encoder bundle, a 3x77 call padded into its 8x128 bucket (replayed
    through a CUDA graph), against eager."""
    torch.manual_seed(0)
    model = tiny_t5_encoder(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                            relative_attention_num_buckets=32, relative_attention_max_distance=128)  # fmt: skip
    model = model.to("cuda", torch.float16)
    path = kernl.compile(model, tmp_path / "bundle", buckets=[(8, 128)], dtype=torch.float16, device="cuda")
    bundle = kernl.load(path, device="cuda")
    for batch, seq in [(3, 77), (8, 128), (1, 5)]:
        inputs = {k: v.cuda() for k, v in t5_inputs(batch, seq, vocab=32128).items()}
        with torch.no_grad():
            want = model(**inputs).last_hidden_state
        got = bundle(**inputs).last_hidden_state
        torch.cuda.synchronize()
        assert torch.isfinite(got).all()
        assert _diff(got, want) < 2e-2, (batch, seq)


FEATURES = {"name": "input_features", "dtype": "float32", "fill": "required", "rank": 3, "dims": ["batch", 12, 48]}


@pytest.mark.parametrize("shape", [(2, 12, 47), (2, 11, 48), (2, 12), (2, 12, 48, 1)])
def test_fixed_shape_checks(shape):
    from kernl.runtime.dispatch import check_inputs

    with pytest.raises(InputError, match=r"input_features: expected shape \[batch, 12, 48\]"):
        check_inputs({"input_features": torch.randn(*shape)}, [FEATURES], [(4, 48)])


def test_fixed_shape_buffers_and_padding():
    from kernl.runtime.dispatch import call_shape, check_inputs, input_shape, pad_into

    features = torch.randn(3, 12, 48)
    tensors = check_inputs({"input_features": features}, [FEATURES], [(4, 48)])
    assert call_shape(tensors, [FEATURES]) == (3, 48)
    assert input_shape(FEATURES, (4, 48)) == (4, 12, 48)
    assert input_shape({"name": "input_ids"}, (4, 48)) == (4, 48)
    buffer = torch.full((4, 12, 48), float("nan"))
    pad_into(buffer, features, is_mask=False)
    assert torch.equal(buffer[:3], features) and not buffer[3:].any()  # a padded row is silence, not NaN
