"""open_bundle: every file on disk is listed, nothing is a link or outside the folder, bytes are read once.

Every tampering test recomputes the hashes and the digest, as an attacker would: the checks must not rest on them.
"""

import json
import os

import pytest

from kernl.artifacts.reader import open_bundle, read_manifest
from kernl.errors import BundleError
from tests.artifacts.bundles import PROGRAM, edit_manifest, entry, reseal, write_bundle, write_file


@pytest.fixture
def bundle(tmp_path):
    return write_bundle(tmp_path / "bundle")


def test_reads_listed_files(bundle):
    with open_bundle(bundle) as files:
        assert files.names("kernels/") == files.names("kernels") == ["kernels/autotune.json"]
        assert set(files.names()) == set(files.manifest["files"])
        assert files.read(PROGRAM) == (bundle / PROGRAM).read_bytes()
        assert json.loads(files.read("kernels/autotune.json"))["linear"]


def test_unlisted_file(bundle):
    write_file(bundle / "kernels" / "cuda_utils.so", os.urandom(64))
    reseal(bundle)  # lists it, with its hash
    edit_manifest(bundle, lambda m: m["files"].pop("kernels/cuda_utils.so"))  # and the careful attacker does not
    with pytest.raises(BundleError, match="cuda_utils.so: not listed"):
        open_bundle(bundle)


@pytest.mark.parametrize("verify", [True, False])
def test_planted_symlink_to_a_file(bundle, tmp_path, verify):
    secret = write_file(tmp_path / "outside" / "secret.txt", b"not the bundle's")
    (bundle / "kernels" / "linked.json").symlink_to(secret)
    reseal(bundle)
    assert "kernels/linked.json" in json.loads((bundle / "manifest.json").read_text())["files"]
    with pytest.raises(BundleError, match="linked.json: a symbolic link"):
        open_bundle(bundle, verify=verify)


def test_planted_symlink_to_a_folder(bundle, tmp_path):
    outside = tmp_path / "outside"
    write_file(outside / "autotune.json", (bundle / "kernels" / "autotune.json").read_bytes())
    (bundle / "kernels" / "autotune.json").unlink()
    (bundle / "kernels").rmdir()
    (bundle / "kernels").symlink_to(outside, target_is_directory=True)
    reseal(bundle)
    with pytest.raises(BundleError, match="kernels: a symbolic link"):
        open_bundle(bundle)


def test_symlinked_listed_file_swapped_in_after_open(bundle, tmp_path):
    files = open_bundle(bundle)
    secret = write_file(tmp_path / "secret.json", (bundle / PROGRAM).read_bytes())
    (bundle / PROGRAM).unlink()
    (bundle / PROGRAM).symlink_to(secret)
    with pytest.raises(BundleError, match="symbolic link"):
        files.read(PROGRAM)


@pytest.mark.parametrize("listed", ["../outside.json", "kernels/../../outside.json", "/ABS", "kernels\\..\\x", "./x"])
def test_listed_path_outside_the_bundle(bundle, tmp_path, listed):
    outside = write_file(tmp_path / "outside.json", b'{"program": "elsewhere"}')
    listed = str(outside) if listed == "/ABS" else listed
    edit_manifest(bundle, lambda m: m["files"].update({listed: entry(outside.read_bytes())}))
    with pytest.raises(BundleError, match="does not name a file inside the bundle"):
        open_bundle(bundle)
    with pytest.raises(BundleError, match="does not name a file inside the bundle"):
        open_bundle(bundle, verify=False)


def test_program_pointing_at_an_unlisted_file(bundle):
    edit_manifest(bundle, lambda m: m["program"].update(file="../../etc/passwd"))
    with pytest.raises(BundleError, match="program.file: listed path '../../etc/passwd' does not name a file inside"):
        open_bundle(bundle)
    edit_manifest(bundle, lambda m: m["program"].update(file="kernels/elsewhere.json"))
    with pytest.raises(BundleError, match="program.file names 'kernels/elsewhere.json', which is not listed"):
        open_bundle(bundle)


def test_swap_after_read_changes_nothing(bundle):
    files = open_bundle(bundle)
    verified = files.read(PROGRAM)
    (bundle / PROGRAM).write_bytes(b'{"nodes": ["os.system"]}')
    reseal(bundle)
    assert files.read(PROGRAM) == verified


def test_swap_between_open_and_read_is_refused(bundle):
    files = open_bundle(bundle)
    original = (bundle / PROGRAM).read_bytes()
    (bundle / PROGRAM).write_bytes(original.replace(b'"nodes": []', b'"nodes": {}'))
    reseal(bundle)  # too late: the manifest was read at open
    with pytest.raises(BundleError, match=f"{PROGRAM}: sha256 does not match"):
        files.read(PROGRAM)


def test_edited_file_with_stale_hash(bundle):
    data = bytearray((bundle / "kernels" / "autotune.json").read_bytes())
    data[-2] = ord("9") if data[-2] != ord("9") else ord("8")
    (bundle / "kernels" / "autotune.json").write_bytes(bytes(data))
    files = open_bundle(bundle)  # same size: opening does not hash
    with pytest.raises(BundleError, match="autotune.json: sha256 does not match"):
        files.read("kernels/autotune.json")
    assert open_bundle(bundle, verify=False).read("kernels/autotune.json") == bytes(data)
    with pytest.raises(BundleError, match="autotune.json: sha256"):
        read_manifest(bundle)


def test_missing_and_resized_files(bundle):
    (bundle / "tokenizer" / "tokenizer.json").write_text("{} ")
    with pytest.raises(BundleError, match="tokenizer.json: size 3 bytes, the manifest says 2"):
        open_bundle(bundle)
    (bundle / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json: listed in the manifest but missing"):
        open_bundle(bundle)


def test_fifo_under_a_listed_name(bundle):
    (bundle / "tokenizer" / "tokenizer.json").unlink()
    os.mkfifo(bundle / "tokenizer" / "tokenizer.json")
    with pytest.raises(BundleError, match="tokenizer.json: not a regular file"):
        open_bundle(bundle)


def test_manifest_checks(bundle):
    edit_manifest(bundle, lambda m: m["files"][PROGRAM].update(sha256="not hex"))
    with pytest.raises(BundleError, match="needs a size in bytes and a sha256"):
        open_bundle(bundle)
    (bundle / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match="manifest.json: expected a JSON object"):
        open_bundle(bundle)
    (bundle / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json: missing"):
        open_bundle(bundle)


def test_digest_ignores_the_signature(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["signature"] = {"algorithm": "ed25519", "value": "added after the digest"}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert open_bundle(bundle).manifest["signature"]["value"] == "added after the digest"
    manifest["dtype"] = "float16"  # any other edit still breaks the digest
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="digest does not match"):
        open_bundle(bundle)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no such bundle"):
        open_bundle(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="manifest.json: missing"):
        open_bundle(tmp_path / "empty")


def test_many_folders(tmp_path):
    """More folders than the bundle keeps descriptors for: each read still resolves beneath the root."""
    from kernl.artifacts.reader import MAX_OPEN_DIRS
    from kernl.artifacts.writer import BundleWriter

    texts = {f"kernels/k{i}/deep/launch.json": f'{{"grid": {i}}}' for i in range(MAX_OPEN_DIRS)}
    with BundleWriter(tmp_path / "many") as writer:
        for rel, text in texts.items():
            writer.write_text(rel, text)
        writer.write_text(PROGRAM, "{}")
        writer.write_text("weights.safetensors", "{}")
        manifest = json.loads((write_bundle(tmp_path / "base") / "manifest.json").read_text())
        root = writer.commit({k: v for k, v in manifest.items() if k not in ("files", "digest")})
    with open_bundle(root) as files:
        assert files.names("kernels/k7") == ["kernels/k7/deep/launch.json"]
        assert {rel: files.read(rel).decode() for rel in files.names("kernels/")} == texts
    with pytest.raises(BundleError, match="closed"):
        files.read("kernels/k0/deep/launch.json")
