"""load_weights: tensors from the bytes read once and hashed, in memory the process owns."""

import json
import struct

import pytest
import torch
from safetensors import safe_open

from kernl.artifacts.reader import open_bundle
from kernl.artifacts.weights import load_weights, save_weights
from kernl.errors import BundleError
from tests.artifacts.bundles import edit_manifest, random_weights, reseal, write_bundle

CPU = torch.device("cpu")


@pytest.fixture
def weights():
    return random_weights()


@pytest.fixture
def bundle(tmp_path, weights):
    return write_bundle(tmp_path / "bundle", weights)


def assert_same(loaded: dict, weights: dict) -> None:
    assert set(loaded) == set(weights)
    for name, t in weights.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t), name


def test_round_trip(bundle, weights):
    tensors, wait = load_weights(open_bundle(bundle), CPU)
    wait()
    assert_same(tensors, weights)
    assert tensors["head"] is tensors["embed"]  # tied weights re-tied
    stored = [t for name, t in tensors.items() if name != "head" and t.numel()]
    assert len({t.untyped_storage().data_ptr() for t in stored}) == len(stored)  # each its own allocation
    assert all(t.data_ptr() % 16 == 0 for t in stored)


def test_tied_weights_stored_once(tmp_path):
    shared = torch.randn(10, 4)
    aliases = save_weights({"a": shared, "b": shared, "c": torch.randn(3)}, tmp_path / "w.safetensors")
    assert aliases == {"b": "a"}
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert set(f.keys()) == {"a", "c"}


@pytest.mark.parametrize("change", ["edit", "truncate", "delete"])
def test_file_changed_after_load(bundle, weights, change):
    tensors, wait = load_weights(open_bundle(bundle), CPU)
    path = bundle / "weights.safetensors"
    if change == "edit":
        path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))
    elif change == "truncate":
        path.write_bytes(b"")
    else:
        path.unlink()
    wait()
    assert_same(tensors, weights)
    assert float(sum(t.double().sum() for t in tensors.values() if t.dtype != torch.bool)) == pytest.approx(
        float(sum(t.double().sum() for t in weights.values() if t.dtype != torch.bool))
    )


def test_flipped_byte_fails_wait(bundle):
    path = bundle / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor: it still parses
    path.write_bytes(bytes(data))
    tensors, wait = load_weights(open_bundle(bundle), CPU)
    with pytest.raises(BundleError, match="weights.safetensors: sha256 does not match"):
        wait()
    tensors, wait = load_weights(open_bundle(bundle), CPU, verify=False)
    wait()  # checks nothing


def test_swapped_between_open_and_load(bundle, tmp_path):
    files = open_bundle(bundle)
    other = write_bundle(tmp_path / "other")  # same layout, other random values: same size
    (bundle / "weights.safetensors").write_bytes((other / "weights.safetensors").read_bytes())
    reseal(bundle)  # too late: the manifest was read at open
    _, wait = load_weights(files, CPU)
    with pytest.raises(BundleError, match="sha256 does not match"):
        wait()


def test_corrupt_header_names_the_hash(bundle):
    path = bundle / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[9] = ord("!")  # the header's JSON
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="weights.safetensors: sha256 does not match"):
        load_weights(open_bundle(bundle), CPU)
    with pytest.raises(BundleError, match="header is not JSON"):
        load_weights(open_bundle(bundle, verify=False), CPU)


def crafted(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12), "hold 8 bytes, the file 12"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 8]}}, bytes(8), "8 bytes for shape"),
        ({"a": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 1]}}, bytes(1), "dtype 'PICKLE'"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "no valid shape"),
    ],
)
def test_crafted_headers(bundle, header, data, message):
    (bundle / "weights.safetensors").write_bytes(crafted(header, data))
    reseal(bundle)
    with pytest.raises(BundleError, match=message):
        load_weights(open_bundle(bundle), CPU)


def test_header_size_beyond_the_file(bundle):
    (bundle / "weights.safetensors").write_bytes(struct.pack("<Q", 2**60) + b"{}")
    reseal(bundle)
    with pytest.raises(BundleError, match="not a safetensors file"):
        load_weights(open_bundle(bundle), CPU)


def test_alias_to_a_missing_tensor(bundle):
    edit_manifest(bundle, lambda m: m["weights"]["aliases"].update(extra="nowhere"))
    with pytest.raises(BundleError, match="'extra' is tied to 'nowhere'"):
        load_weights(open_bundle(bundle), CPU)


def test_weights_file_not_listed(bundle):
    edit_manifest(bundle, lambda m: m["weights"].update(file="../weights.safetensors"))
    with pytest.raises(BundleError, match="weights.file: listed path '../weights.safetensors' does not name a file"):
        open_bundle(bundle)
    edit_manifest(bundle, lambda m: m["weights"].update(file="weights2.safetensors"))
    with pytest.raises(BundleError, match="weights.file names 'weights2.safetensors', which is not listed"):
        open_bundle(bundle)
