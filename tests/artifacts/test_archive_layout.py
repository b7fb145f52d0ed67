"""Archives an attacker writes by hand: a sparse member declaring gigabytes, a member larger than the archive, a
compression bomb. Each is refused at once, before anything is hashed or written into the cache."""

import io
import json
import lzma
import tarfile
import time

import pytest

from kernl.artifacts.archive import pack
from kernl.artifacts.manifest import manifest_digest
from kernl.artifacts.reader import open_bundle
from kernl.errors import BundleError
from tests.artifacts.bundles import write_bundle


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "bundles"


def cached(cache) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def members_of(archive) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(archive) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def write_tar(path, members) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(out.getvalue())


def test_sparse_member_declaring_gigabytes(tmp_path, cache):
    archive = pack(write_bundle(tmp_path / "bundle"), tmp_path / "b.kernl")
    members = members_of(archive)
    index = next(i for i, (m, _) in enumerate(members) if m.name == "weights.safetensors")
    info = tarfile.TarInfo("weights.safetensors")
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "weights.safetensors",
        "GNU.sparse.realsize": str(8 << 30),  # 8 GiB of holes
    }
    data = b"1\n0\n512\n".ljust(512, b"\0") + b"x" * 512
    info.size = len(data)
    members[index] = (info, data)
    write_tar(archive, members)
    start = time.perf_counter()
    with pytest.raises(BundleError, match="'weights.safetensors' is not a regular file"):
        open_bundle(archive)
    assert time.perf_counter() - start < 5 and cached(cache) == []


def test_listed_sizes_beyond_the_archive(tmp_path, cache):
    archive = pack(write_bundle(tmp_path / "bundle"), tmp_path / "b.kernl")
    members = members_of(archive)
    manifest = json.loads(members[0][1])
    manifest["files"]["weights.safetensors"]["size"] = 8 << 30
    manifest["digest"] = manifest_digest(manifest)
    raw = json.dumps(manifest).encode()
    info = tarfile.TarInfo("manifest.json")
    info.size = len(raw)
    write_tar(archive, [(info, raw), *members[1:]])
    with pytest.raises(BundleError, match="lists more bytes than the archive holds"):
        open_bundle(archive)
    assert cached(cache) == []


def test_compression_bomb_refused_before_reading(tmp_path, cache):
    """A few hundred KiB of xz that would inflate to gigabytes: refused by its first bytes."""
    archive = tmp_path / "bomb.kernl"
    archive.write_bytes(lzma.compress(bytes(64 << 20), preset=9))  # 64 MiB of zeros in ~10 KiB
    with pytest.raises(BundleError, match="xz-compressed"):
        open_bundle(archive)
    assert cached(cache) == []
