"""A damaged or foreign bundle fails with a BundleError that names the file; writing is atomic."""

import json
import shutil

import pytest
import torch

import kernl
from kernl.artifacts.writer import BundleWriter
from tests.models import tiny_bert


@pytest.fixture
def bundle(tiny_bert_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bert_bundle[1], copy)
    return copy


def test_missing_file(bundle):
    (bundle / "program.py").unlink()
    with pytest.raises(kernl.BundleError, match="program.py"):
        kernl.load(bundle)


def test_bit_flipped_weights(bundle):
    path = bundle / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(kernl.BundleError, match="weights.safetensors.*sha256"):
        kernl.load(bundle)


def test_truncated_weights(bundle):
    path = bundle / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(kernl.BundleError, match="weights.safetensors.*size"):
        kernl.load(bundle)


def test_unknown_format_version(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] = 999
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(kernl.BundleError, match="format version 999"):
        kernl.load(bundle)


def test_not_json(bundle):
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(kernl.BundleError, match="manifest.json"):
        kernl.load(bundle)


def test_tied_weights_stored_once(tmp_path):
    from safetensors import safe_open

    from kernl.artifacts.weights import load_weights, save_weights

    shared = torch.randn(10, 4)
    aliases = save_weights({"a": shared, "b": shared, "c": torch.randn(3)}, tmp_path / "w.safetensors")
    assert aliases == {"b": "a"}
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert set(f.keys()) == {"a", "c"}
    loaded = load_weights(tmp_path / "w.safetensors", aliases, torch.device("cpu"))
    assert torch.equal(loaded["b"], shared) and loaded["b"] is loaded["a"]


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError), BundleWriter(out) as writer:
        writer.write_text("program.py", "x = 1\n")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(kernl.KernlError, match="already exists"):
        kernl.compile(tiny_bert(), out, buckets=[(1, 8)], device="cpu")
    assert (out / "keep.txt").read_text() == "mine"
