"""Ed25519 signatures of the manifest: a round trip verifies; any edit, a foreign key or no signature fails."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("cryptography", reason="signing needs the optional extra kernl[sign]")
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519  # noqa: E402

from kernl.artifacts.manifest import FORMAT_VERSION, manifest_digest
from kernl.artifacts.signing import check_signature, generate_key, key_id, load_public_key, signer
from kernl.errors import BundleError, InputError, KernlError

REPO = Path(__file__).resolve().parents[2]


def manifest_body(seed: int) -> dict:
    """A manifest's content as the writer has it before the digest: files with sizes and hashes."""
    return {
        "format_version": FORMAT_VERSION,
        "model": f"Model{seed}",
        "files": {
            "weights.safetensors": {"size": 1000 + seed, "sha256": f"{seed:064x}"},
            "program.json": {"size": 99, "sha256": f"{seed + 1:064x}"},
        },
        "program": {"file": "program.json", "inputs": ["input_ids"]},
    }


def written(body: dict, sign=None) -> dict:
    """The manifest as the writer commits it: digest over the content, then the sign hook's entry."""
    manifest = {**copy.deepcopy(body), "digest": manifest_digest(body)}
    if sign is not None:
        manifest["signature"] = sign(manifest["digest"])
    return manifest


def public_pem(private: ed25519.Ed25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def keys(tmp_path):
    """A key pair on disk (kernl keygen's files) and a second, foreign key."""
    private_path, public_path = generate_key(tmp_path / "release")
    return private_path, public_path, ed25519.Ed25519PrivateKey.generate()


def test_round_trip(keys):
    private_path, public_path, _ = keys
    manifest = written(manifest_body(1), signer(private_path))
    entry = manifest["signature"]
    assert entry["algorithm"] == "ed25519" and len(entry["key_id"]) == 16
    pub = load_public_key(public_path)
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert entry["key_id"] == key_id(raw)
    for trusted in ([public_path], [str(public_path)], [public_path.read_bytes()], [pub], public_path):
        assert check_signature(manifest, trusted) == entry["key_id"]
    # Among several trusted keys, the one that signed is found.
    other = ed25519.Ed25519PrivateKey.generate()
    assert check_signature(manifest, [public_pem(other), public_path]) == entry["key_id"]
    assert check_signature(manifest, None) == entry["key_id"]


def test_signer_takes_pem_bytes_and_key_objects(keys):
    private_path, public_path, _ = keys
    key = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    for form in (private_path.read_bytes(), key, str(private_path)):
        manifest = written(manifest_body(2), signer(form))
        assert check_signature(manifest, [public_path]) == manifest["signature"]["key_id"]


def test_edited_file_list_with_recomputed_digest_fails(keys):
    private_path, public_path, _ = keys
    manifest = written(manifest_body(3), signer(private_path))
    manifest["files"]["weights.safetensors"]["sha256"] = "f" * 64  # a swapped weights file...
    manifest["digest"] = manifest_digest({k: v for k, v in manifest.items() if k != "signature"})  # ...re-hashed
    with pytest.raises(BundleError, match="does not match the manifest"):
        check_signature(manifest, [public_path])
    manifest["files"]["kernels/evil.so"] = {"size": 1, "sha256": "0" * 64}  # or a file added
    with pytest.raises(BundleError, match="does not match"):
        check_signature(manifest, [public_path])


def test_edited_digest_fails(keys):
    private_path, public_path, _ = keys
    manifest = written(manifest_body(4), signer(private_path))
    manifest["digest"] = "0" * 64
    with pytest.raises(BundleError, match="digest does not match"):
        check_signature(manifest, [public_path])


def test_signature_copied_from_another_bundle_fails(keys):
    private_path, public_path, _ = keys
    sign = signer(private_path)
    genuine = written(manifest_body(5), sign)
    forged = written(manifest_body(6))  # a consistent manifest with its own digest...
    forged["signature"] = genuine["signature"]  # ...and the release key's signature of another bundle
    with pytest.raises(BundleError, match="does not match the manifest"):
        check_signature(forged, [public_path])
    forged["digest"] = genuine["digest"]  # claiming the signed digest does not help: the digest is recomputed
    with pytest.raises(BundleError, match="digest does not match"):
        check_signature(forged, [public_path])


def test_foreign_key_fails(keys):
    _, public_path, foreign = keys
    manifest = written(manifest_body(7), signer(foreign))
    with pytest.raises(BundleError, match=f"signed by {manifest['signature']['key_id']}, which is not a trusted"):
        check_signature(manifest, [public_path])


def test_trusted_public_key_with_a_foreign_signature_fails(keys):
    """A forger who puts the trusted public key in the entry still cannot produce its signature."""
    private_path, public_path, foreign = keys
    manifest = written(manifest_body(8), signer(foreign))
    manifest["signature"].update(
        {k: written(manifest_body(8), signer(private_path))["signature"][k] for k in ("public_key", "key_id")}
    )
    with pytest.raises(BundleError, match="does not match the manifest"):
        check_signature(manifest, [public_path])


def test_unsigned(keys):
    _, public_path, _ = keys
    manifest = written(manifest_body(9))
    assert check_signature(manifest, None) is None
    with pytest.raises(BundleError, match="unsigned"):
        check_signature(manifest, [public_path])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.update(algorithm="rsa"), "algorithm 'rsa'"),
        (lambda s: s.update(key_id="0" * 16), "key_id"),
        (lambda s: s.update(public_key="not base64!"), "public key"),
        (lambda s: s.update(value=s["value"][:20]), "value"),
    ],
)
def test_malformed_signature_entry(keys, edit, message):
    private_path, public_path, _ = keys
    manifest = written(manifest_body(10), signer(private_path))
    edit(manifest["signature"])
    for trusted in (None, [public_path]):
        with pytest.raises(BundleError, match=message):
            check_signature(manifest, trusted)


def test_bad_keys(keys, tmp_path):
    private_path, public_path, _ = keys
    manifest = written(manifest_body(11), signer(private_path))
    with pytest.raises(InputError, match="empty"):
        check_signature(manifest, [])
    with pytest.raises(InputError, match="cannot read"):
        check_signature(manifest, [tmp_path / "missing.pub"])
    with pytest.raises(InputError, match="not a PEM public key"):
        check_signature(manifest, [private_path])
    with pytest.raises(InputError, match="not a PEM private key"):
        signer(public_path)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pem = ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(InputError, match="Ed25519"):
        signer(ec_pem)
    encrypted = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    with pytest.raises(InputError, match="encrypted"):
        signer(encrypted)
    with pytest.raises(KernlError, match="digest"):
        signer(private_path)("not a digest")


def test_generate_key_files(tmp_path):
    private_path, public_path = generate_key(tmp_path / "keys" / "k")
    assert public_path == tmp_path / "keys" / "k.pub"
    assert os.stat(private_path).st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in private_path.read_bytes() and b"PUBLIC KEY" in public_path.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        generate_key(private_path)
    before = public_path.read_bytes()
    generate_key(private_path, overwrite=True)
    assert public_path.read_bytes() != before  # a new key


def test_reading_who_signed_imports_no_cryptography(keys):
    private_path, _, _ = keys
    manifest = written(manifest_body(12), signer(private_path))
    code = (
        "import json, sys; from kernl.artifacts.signing import check_signature; "
        "print(check_signature(json.loads(sys.stdin.read())), 'cryptography' in sys.modules)"
    )
    import json

    proc = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(manifest), capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [manifest["signature"]["key_id"], "False"]


def test_signed_by_the_writer_verified_through_the_reader(keys, tmp_path):
    """The writer's sign hook and the reader's recomputed digest agree; a re-signed copy by another key does not."""
    import json

    from kernl.artifacts.reader import open_bundle
    from kernl.artifacts.writer import BundleWriter
    from tests.artifacts.bundles import minimal_manifest

    private_path, public_path, foreign = keys
    with BundleWriter(tmp_path / "b") as writer:
        writer.write_text("weights.safetensors", "not really weights")
        writer.write_text("program.json", "{}")
        path = writer.commit(minimal_manifest(), sign=signer(private_path))
    manifest = open_bundle(path).manifest  # the reader checks the digest, which excludes the signature
    assert check_signature(manifest, [public_path]) == manifest["signature"]["key_id"]
    on_disk = json.loads((path / "manifest.json").read_text())
    on_disk["signature"] = signer(foreign)(on_disk["digest"])  # re-signed by someone else
    with pytest.raises(BundleError, match="not a trusted key"):
        check_signature(on_disk, [public_path])
