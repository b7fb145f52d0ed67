"""Large files are listed with the sha256 of each piece and checked piece by piece in parallel at load."""

import hashlib
import json

import pytest
import torch

from kernl.artifacts import hashing
from kernl.artifacts.hashing import PieceHasher, file_entry
from kernl.artifacts.reader import open_bundle
from kernl.artifacts.weights import load_weights
from kernl.errors import BundleError
from tests.artifacts.bundles import edit_manifest, write_bundle

CPU = torch.device("cpu")
MIB = 1 << 20


@pytest.mark.parametrize("size", [MIB - 3, MIB, 2 * MIB, 2 * MIB + 5, 3 * MIB + MIB // 2])
def test_file_entry_lists_each_piece(tmp_path, size):
    data = torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    entry = file_entry(path, MIB)
    assert entry["size"] == size and entry["sha256"] == hashlib.sha256(data).hexdigest()
    if size <= MIB:
        assert "pieces" not in entry
        return
    expected = [hashlib.sha256(data[i : i + MIB]).hexdigest() for i in range(0, size, MIB)]
    assert entry["pieces"] == {"bytes": MIB, "sha256": expected}


def test_piece_hasher_ignores_how_buffers_are_cut():
    data = torch.randint(0, 256, (5 * MIB + 17,), dtype=torch.uint8).numpy().tobytes()
    expected = [hashlib.sha256(data[i : i + 2 * MIB]).hexdigest() for i in range(0, len(data), 2 * MIB)]
    cuts = sorted(torch.randint(0, len(data), (9,)).tolist())
    hasher = PieceHasher(2 * MIB, expected)
    for begin, end in zip([0, *cuts], [*cuts, len(data)]):
        hasher.feed(data[begin:end])
    assert hasher.matches()
    short = PieceHasher(2 * MIB, expected)
    short.feed(data[:-1])
    assert not short.matches()


@pytest.fixture
def big_bundle(tmp_path, monkeypatch):
    monkeypatch.setattr(hashing, "PIECE", MIB)
    weights = {"a": torch.randn(300_000), "b": torch.randn(7, 5).half(), "c": torch.randn(250_001)}
    root = write_bundle(tmp_path / "bundle", weights)
    return root, weights


def test_bundle_lists_and_checks_pieces(big_bundle):
    root, weights = big_bundle
    entry = json.loads((root / "manifest.json").read_text())["files"]["weights.safetensors"]
    assert entry["pieces"]["bytes"] == MIB and len(entry["pieces"]["sha256"]) == -(-entry["size"] // MIB)
    tensors, wait = load_weights(open_bundle(root), CPU)
    wait()
    for name, t in weights.items():
        assert torch.equal(tensors[name], t)
    open_bundle(root).check_all()


def test_flipped_byte_in_a_middle_piece(big_bundle):
    root, _ = big_bundle
    path = root / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[MIB + 1234] ^= 0x01
    path.write_bytes(bytes(data))
    _, wait = load_weights(open_bundle(root), CPU)
    with pytest.raises(BundleError, match="sha256 does not match"):
        wait()
    with pytest.raises(BundleError, match="sha256 does not match"):
        open_bundle(root).check_all()


def test_piece_list_edited(big_bundle):
    root, _ = big_bundle
    edit_manifest(root, lambda m: m["files"]["weights.safetensors"]["pieces"]["sha256"].pop())
    _, wait = load_weights(open_bundle(root), CPU)
    with pytest.raises(BundleError, match="sha256 does not match"):
        wait()
    edit_manifest(root, lambda m: m["files"]["weights.safetensors"]["pieces"].update(bytes=12))
    with pytest.raises(BundleError, match="pieces"):
        open_bundle(root)
