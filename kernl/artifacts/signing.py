"""Optional Ed25519 signatures of a bundle's manifest (the `cryptography` library: `pip install 'kernl[sign]'`).

A signature is over the manifest's digest, which covers every key but "digest" and "signature", and so every
file's sha256: one signature vouches for the whole bundle. The checker recomputes that digest itself, never
trusting the manifest's "digest" field, so a signature copied from another bundle does not verify.
`cryptography` is imported only to sign or to check against trusted keys; reading who signed needs only hashlib.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kernl.artifacts.manifest import manifest_digest
from kernl.errors import BundleError, InputError, KernlError

SIGNATURE = "signature"
ALGORITHM = "ed25519"
# What is signed: this prefix, then the manifest digest in hex. The prefix keeps a kernl signature from being
# valid as anything else the same key may sign.
MESSAGE_PREFIX = b"kernl bundle manifest sha256:"
KEY_ID_HEX = 16  # a key's id: the first 64 bits of the sha256 of its raw 32 bytes, in hex


def _crypto():
    """cryptography's Ed25519 and serialization modules, or a KernlError saying how to install them."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise KernlError("signing and trusted keys need the cryptography library: pip install 'kernl[sign]'") from None
    return ed25519, serialization


def key_id(raw_public_key: bytes) -> str:
    """A short fingerprint of a public key (its 32 raw bytes), as `kernl inspect` shows it."""
    return hashlib.sha256(raw_public_key).hexdigest()[:KEY_ID_HEX]


def _message(digest: str) -> bytes:
    return MESSAGE_PREFIX + digest.encode("ascii")


def _pem_bytes(key: Any, what: str) -> bytes:
    """The PEM bytes of key when it is a path or bytes; InputError when the file cannot be read."""
    if isinstance(key, bytes | bytearray):
        return bytes(key)
    if isinstance(key, str | os.PathLike):
        try:
            return Path(key).expanduser().read_bytes()
        except OSError as err:
            raise InputError(f"{what} {key}: cannot read it ({err.strerror or err})") from None
    raise InputError(f"{what}: expected a path to a PEM file, PEM bytes or a key object, got {type(key).__name__}")


def load_private_key(key: Any):
    """An Ed25519PrivateKey from a path to an unencrypted PEM file, PEM bytes, or the key itself."""
    ed25519, serialization = _crypto()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    data = _pem_bytes(key, "signing key")
    name = key if isinstance(key, str | os.PathLike) else "signing key"
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise InputError(f"{name}: the key is encrypted; kernl signs with unencrypted keys (kernl keygen)") from None
    except ValueError:
        raise InputError(f"{name}: not a PEM private key") from None
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise InputError(f"{name}: a {type(loaded).__name__}, kernl signs with Ed25519 keys (kernl keygen)")
    return loaded


def load_public_key(key: Any):
    """An Ed25519PublicKey from a path to a PEM file, PEM bytes, or the key itself."""
    ed25519, serialization = _crypto()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    data = _pem_bytes(key, "trusted key")
    name = key if isinstance(key, str | os.PathLike) else "trusted key"
    try:
        loaded = serialization.load_pem_public_key(data)
    except ValueError:
        raise InputError(f"{name}: not a PEM public key") from None
    if not isinstance(loaded, ed25519.Ed25519PublicKey):
        raise InputError(f"{name}: a {type(loaded).__name__}, kernl checks Ed25519 keys")
    return loaded


def _raw(public_key) -> bytes:
    _, serialization = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_id(key: Any) -> str:
    """The key_id of a public key given as load_public_key takes it (path, PEM bytes, key object)."""
    return key_id(_raw(load_public_key(key)))


def signer(key: Any) -> Callable[[str], dict[str, str]]:
    """The bundle writer's sign hook for key (path to a PEM private key, PEM bytes, or an Ed25519PrivateKey).

    The hook takes the manifest digest (hex) and returns the manifest's "signature" entry:
    {"algorithm": "ed25519", "public_key": base64 of the raw 32 bytes, "key_id": ..., "value": base64 signature}.
    The key is loaded now, so a bad key fails before anything is compiled.
    """
    private = load_private_key(key)
    raw = _raw(private.public_key())
    entry = {"algorithm": ALGORITHM, "public_key": base64.b64encode(raw).decode(), "key_id": key_id(raw)}

    def sign(digest: str) -> dict[str, str]:
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise KernlError(f"sign: expected the manifest's sha256 digest in hex, got {digest!r}")
        return {**entry, "value": base64.b64encode(private.sign(_message(digest))).decode()}

    return sign


def _b64(value: Any, length: int, what: str) -> bytes:
    try:
        data = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except (binascii.Error, ValueError):
        data = b""
    if len(data) != length:
        raise BundleError(f"manifest.json: the signature's {what} is not {length} bytes of base64")
    return data


def _read_entry(manifest: dict[str, Any]) -> tuple[bytes, bytes] | None:
    """(raw public key, signature) of the manifest's signature entry; None when unsigned; BundleError when malformed."""
    entry = manifest.get(SIGNATURE)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise BundleError("manifest.json: 'signature' is not an object")
    if entry.get("algorithm") != ALGORITHM:
        raise BundleError(f"manifest.json: signature algorithm {entry.get('algorithm')!r}; kernl checks {ALGORITHM}")
    raw = _b64(entry.get("public_key"), 32, "public key")
    value = _b64(entry.get("value"), 64, "value")
    if entry.get("key_id") != key_id(raw):
        raise BundleError("manifest.json: the signature's key_id is not its public key's fingerprint")
    return raw, value


def embedded_public_key(manifest: dict[str, Any]):
    """The Ed25519PublicKey the manifest's signature names (None when unsigned): check_signature(manifest, [it])
    tells whether the signature is intact, not whether the key is one to trust."""
    entry = _read_entry(manifest)
    if entry is None:
        return None
    ed25519, _ = _crypto()
    return ed25519.Ed25519PublicKey.from_public_bytes(entry[0])


def _digest(manifest: dict[str, Any]) -> str:
    """The digest the signature must cover, recomputed from the manifest's content (without its signature)."""
    return manifest_digest({k: v for k, v in manifest.items() if k != SIGNATURE})


def check_signature(manifest: dict[str, Any], trusted_keys: Iterable[Any] | None = None) -> str | None:
    """Who signed the manifest, checked against trusted_keys when given.

    trusted_keys None: the signer's key_id when the manifest is signed (not verified against anyone), else None;
    `cryptography` is not imported. With trusted keys (paths to PEM public keys, PEM bytes, Ed25519PublicKey
    objects): BundleError when the bundle is unsigned, signed by a key not in the list, or its signature does
    not verify over the digest recomputed here; otherwise the signer's key_id.
    """
    entry = _read_entry(manifest)
    if trusted_keys is None:
        return key_id(entry[0]) if entry else None
    if isinstance(trusted_keys, str | bytes | os.PathLike):
        trusted_keys = [trusted_keys]  # one key, not a sequence of characters
    keys = [load_public_key(k) for k in trusted_keys]
    if not keys:
        raise InputError("trusted_keys is empty: pass None to load unsigned bundles, or the keys you trust")
    trusted = ", ".join(key_id(_raw(k)) for k in keys)
    if entry is None:
        raise BundleError(f"manifest.json: the bundle is unsigned; only bundles signed by {trusted} are trusted")
    raw, value = entry
    match = next((k for k in keys if _raw(k) == raw), None)
    if match is None:
        raise BundleError(f"manifest.json: signed by {key_id(raw)}, which is not a trusted key ({trusted})")
    digest = _digest(manifest)
    if manifest.get("digest") != digest:
        raise BundleError("manifest.json: edited after the bundle was written (its digest does not match)")
    from cryptography.exceptions import InvalidSignature

    try:
        match.verify(value, _message(digest))
    except InvalidSignature:
        raise BundleError(
            f"manifest.json: the signature by {key_id(raw)} does not match the manifest (edited after signing)"
        ) from None
    return key_id(raw)


def generate_key(path: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 private key to path (PEM, mode 0600) and its public key to path + ".pub" (PEM)."""
    ed25519, serialization = _crypto()
    private_path = Path(path).expanduser()
    public_path = private_path.with_name(private_path.name + ".pub")
    for p in (private_path, public_path):
        if p.exists() and not overwrite:
            raise InputError(f"{p} already exists (use --force to replace it)")
    private = ed25519.Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    # Created 0600 from the start: the private key is never readable by others, not even for a moment.
    private_path.unlink(missing_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path
