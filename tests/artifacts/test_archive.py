"""Archives: only kernl's layout unpacks, only listed files are written, a cached extraction is checked."""

import gzip
import io
import json
import multiprocessing
import os
import stat
import tarfile
import time

import pytest
import torch

from kernl.artifacts.archive import _Archive, open_archive, pack, unpack
from kernl.artifacts.manifest import manifest_digest
from kernl.artifacts.reader import open_bundle
from kernl.artifacts.weights import load_weights
from kernl.errors import BundleError
from tests.artifacts.bundles import PROGRAM, write_bundle


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "bundles"


@pytest.fixture
def bundle(tmp_path):
    return write_bundle(tmp_path / "bundle")


def entries(cache) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def files_under(folder) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_round_trip(bundle, cache):
    archive = pack(bundle)
    assert archive.name == "bundle.kernl" and stat.S_IMODE(archive.stat().st_mode) == 0o644
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names[0] == "manifest.json" and set(names[1:]) == files_under(bundle) - {"manifest.json"}
    for _ in range(2):  # the second open reuses the extraction
        with open_bundle(archive) as files:
            assert files.archive == archive and files.root.parent == cache
            assert files.read(PROGRAM) == (bundle / PROGRAM).read_bytes()
            tensors, wait = load_weights(files, torch.device("cpu"))
            wait()
    assert len(entries(cache)) == 1
    assert stat.S_IMODE(files.root.stat().st_mode) == 0o755
    assert stat.S_IMODE((files.root / PROGRAM).stat().st_mode) == 0o644
    assert pack(bundle).read_bytes() == archive.read_bytes()  # reproducible


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def kernl_members(bundle) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The members pack() writes, as (info, bytes)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    return [regular("manifest.json", (bundle / "manifest.json").read_bytes())] + [
        regular(rel, (bundle / rel).read_bytes()) for rel in sorted(manifest["files"])
    ]


@pytest.mark.parametrize("compress", [gzip.compress, "xz", "bz2"])
def test_compressed_archive_refused(bundle, cache, tmp_path, compress):
    import bz2
    import lzma

    compress = {"xz": lzma.compress, "bz2": bz2.compress}.get(compress, compress)
    archive = tmp_path / "packed.kernl"
    archive.write_bytes(compress(pack(bundle, tmp_path / "plain.kernl").read_bytes()))
    with pytest.raises(BundleError, match="compressed; a kernl archive is an uncompressed tar"):
        open_bundle(archive)
    assert entries(cache) == []


@pytest.mark.parametrize("where", ["first", "after the manifest", "last"])
@pytest.mark.parametrize("name", ["program.py", "kernels/cuda_utils.so", "../escape.py", "/tmp/kernl-abs-escape.py"])
def test_member_not_in_the_manifest_is_never_written(bundle, cache, tmp_path, where, name):
    members = kernl_members(bundle)
    evil = regular(name, b"import os; os.system('touch marker')\n")
    members.insert({"first": 0, "after the manifest": 1, "last": len(members)}[where], evil)
    archive = tmp_path / "evil.kernl"
    archive.write_bytes(tar_bytes(members))
    with pytest.raises(BundleError, match="first member" if where == "first" else "not listed in its manifest"):
        open_bundle(archive)
    base = os.path.basename(name)
    assert not any(p.name == base for p in tmp_path.rglob("*")), "the unlisted member was written"
    assert not os.path.exists("/tmp/kernl-abs-escape.py")
    assert entries(cache) == []  # no extraction, no leftover temporary folder


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_link_members_refused(bundle, cache, tmp_path, kind):
    members = kernl_members(bundle)
    info = tarfile.TarInfo(PROGRAM)
    info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
    info.linkname = "/etc/passwd"
    index = next(i for i, (m, _) in enumerate(members) if m.name == PROGRAM)
    members[index] = (info, None)
    archive = tmp_path / "links.kernl"
    archive.write_bytes(tar_bytes(members))
    with pytest.raises(BundleError, match=f"{PROGRAM}' is not a regular file"):
        open_bundle(archive)
    assert entries(cache) == []


def test_tampered_member_refused(bundle, cache, tmp_path):
    members = kernl_members(bundle)
    index = next(i for i, (m, _) in enumerate(members) if m.name == PROGRAM)
    info, data = members[index]
    members[index] = (info, data.replace(b"[]", b"[0"))  # same size, stale hash
    archive = tmp_path / "tampered.kernl"
    archive.write_bytes(tar_bytes(members))
    with pytest.raises(BundleError, match=f"{PROGRAM}'.*sha256 does not match"):
        open_bundle(archive)
    assert entries(cache) == []


def test_member_count_and_size_caps(bundle, cache, tmp_path):
    folders = [tarfile.TarInfo(f"d{i}") for i in range(40)]
    for f in folders:
        f.type = tarfile.DIRTYPE
    archive = tmp_path / "many.kernl"
    members = kernl_members(bundle)
    archive.write_bytes(tar_bytes(members[:1] + [(f, None) for f in folders] + members[1:]))
    with pytest.raises(BundleError, match="member 'd0' is not a regular file"):  # pack() writes no folders
        open_bundle(archive)
    archive.write_bytes(tar_bytes(members + members[1:2]))  # a listed file once more, at the end
    with pytest.raises(BundleError, match="appears twice"):
        open_bundle(archive)
    archive.write_bytes(tar_bytes(members[:1] + members[1:][::-1]))
    with pytest.raises(BundleError, match="out of place"):
        open_bundle(archive)
    manifest = json.loads(members[0][1])
    manifest["files"]["weights.safetensors"]["size"] = 1 << 40  # more bytes than the archive holds
    manifest["digest"] = manifest_digest(manifest)
    archive.write_bytes(tar_bytes([regular("manifest.json", json.dumps(manifest).encode()), *members[1:]]))
    with pytest.raises(BundleError, match="more bytes than the archive holds"):
        open_bundle(archive)
    assert entries(cache) == []


def test_damaged_extraction_is_extracted_again(bundle, cache):
    archive = pack(bundle)
    root = unpack(archive)
    program = (bundle / PROGRAM).read_bytes()
    (root / PROGRAM).write_bytes(program.replace(b"[]", b"[0"))  # same size: only the hash tells
    (root / "kernels" / "planted.py").write_text("print('hi')\n")
    with open_bundle(archive) as files:
        assert files.root == root and files.read(PROGRAM) == program
    assert not (root / "kernels" / "planted.py").exists()
    assert len(entries(cache)) == 1


def test_extraction_with_a_symlink_is_extracted_again(bundle, cache, tmp_path):
    archive = pack(bundle)
    root = unpack(archive)
    (tmp_path / "elsewhere.json").write_bytes((root / PROGRAM).read_bytes())
    (root / PROGRAM).unlink()
    (root / PROGRAM).symlink_to(tmp_path / "elsewhere.json")
    assert open_archive(archive).read(PROGRAM) == (bundle / PROGRAM).read_bytes()
    assert not (root / PROGRAM).is_symlink()


def test_extraction_replaced_by_a_link_is_not_followed(bundle, cache, tmp_path):
    import shutil

    archive = pack(bundle)
    root = unpack(archive)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(root, elsewhere)  # a copy that passes every check, but outside the cache
    root.symlink_to(elsewhere, target_is_directory=True)
    with open_bundle(archive) as files:
        assert files.root == root and not root.is_symlink()
        assert files.read(PROGRAM) == (bundle / PROGRAM).read_bytes()
    assert len(entries(cache)) == 1


def _unpack_in_child(archive: str, start, results) -> None:
    try:
        start.wait(timeout=60)
        with open_bundle(archive) as files:
            results.put((str(files.root), files.read(PROGRAM).hex()))
    except BaseException as err:
        results.put(("failed", repr(err)))


def test_processes_unpacking_at_once_all_succeed(tmp_path, cache, monkeypatch):
    big = {"w": torch.randn(4, 1 << 18), "b": torch.randn(7)}
    archive = pack(write_bundle(tmp_path / "bundle", big))
    ctx = multiprocessing.get_context("fork")  # the children inherit the patch below; they only read and write files
    start, results, extractions = ctx.Barrier(3), ctx.Queue(), ctx.Value("i", 0)
    extract = _Archive.extract

    def slow_extract(self, *args, **kwargs):
        with extractions.get_lock():
            extractions.value += 1
        time.sleep(0.5)  # the others arrive meanwhile, and wait for this copy rather than write their own
        return extract(self, *args, **kwargs)

    monkeypatch.setattr(_Archive, "extract", slow_extract)
    children = [ctx.Process(target=_unpack_in_child, args=(str(archive), start, results)) for _ in range(3)]
    for child in children:
        child.start()
    got = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
    assert all(root != "failed" for root, _ in got), got
    assert len(set(got)) == 1
    assert extractions.value == 1
    assert entries(cache) == [os.path.basename(got[0][0])], "a temporary folder was left behind"
    assert bytes.fromhex(got[0][1]) == (tmp_path / "bundle" / PROGRAM).read_bytes()


def test_not_a_tar(cache, tmp_path):
    bad = tmp_path / "bad.kernl"
    bad.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BundleError, match="bad.kernl: not a readable kernl archive"):
        open_bundle(bad)
