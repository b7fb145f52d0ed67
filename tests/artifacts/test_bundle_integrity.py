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


def test_edited_manifest(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["buckets"].append([64, 64])  # e.g. a hand edit that would let calls overrun the program
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(kernl.BundleError, match="manifest.json: edited"):
        kernl.load(bundle)


def test_archive_round_trip(tiny_bert_bundle, tmp_path, monkeypatch):
    from kernl.artifacts.archive import pack

    monkeypatch.setenv("KERNL_CACHE", str(tmp_path / "cache"))
    model, path = tiny_bert_bundle
    archive = pack(path, tmp_path / "bert.kernl")
    ids = torch.randint(0, 99, (2, 11))
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
    for _ in range(2):  # the second load reuses the extracted folder
        out = kernl.load(archive)(input_ids=ids).last_hidden_state
        assert (out - want).abs().max() <= 1e-4
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_corrupt_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNL_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.kernl"
    bad.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(kernl.BundleError, match="bad.kernl"):
        kernl.load(bad)
