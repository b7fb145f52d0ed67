"""BundleWriter: files readable by all whatever the umask, an optional signature outside the digest, no links."""

import json
import os
import stat

import pytest

from kernl.artifacts.manifest import manifest_digest
from kernl.artifacts.reader import open_bundle
from kernl.artifacts.writer import BundleWriter
from kernl.errors import KernlError
from tests.artifacts.bundles import write_bundle


@pytest.fixture
def strict_umask():
    old = os.umask(0o077)
    yield
    os.umask(old)


def test_files_readable_by_all(tmp_path, strict_umask):
    root = write_bundle(tmp_path / "bundle")
    for path in [root, *root.rglob("*")]:
        want = 0o755 if path.is_dir() else 0o644
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_sign_hook(tmp_path):
    seen = []

    def sign(digest: str) -> dict:
        seen.append(digest)
        return {"algorithm": "test", "value": digest[::-1]}

    root = write_bundle(tmp_path / "bundle", sign=sign)
    manifest = json.loads((root / "manifest.json").read_text())
    assert seen == [manifest["digest"]] == [manifest_digest(manifest)]
    assert manifest["signature"] == {"algorithm": "test", "value": manifest["digest"][::-1]}
    assert open_bundle(root).manifest["signature"]["value"] == manifest["digest"][::-1]


def test_links_refused(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(KernlError, match="no links"), BundleWriter(out) as writer:
        writer.write_text("program.json", "{}")
        (writer.root / "kernels").symlink_to(tmp_path, target_is_directory=True)
        writer.commit({"format_version": 1})
    assert not out.exists()
