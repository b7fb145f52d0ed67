"""A bundle's kernels/ holds device code and launch metadata only; installing them writes nothing else, once."""

import json
import os
import stat

import pytest

from kernl.errors import BundleError, KernlError
from kernl.kernels import session, triton_cache
from kernl.kernels.triton_cache import AUTOTUNE_FILE, check_names, parse_members, write_kernels

KEY = "7FBPRU7QBYIJB5L6E23UWXUVS5WHTSK5XJZ7AM2Q6TGK5KWNE64Q"  # Triton's cache keys: base32 of a sha256
OTHER = "B" * 52


def metadata(name: str = "add_one") -> bytes:
    return json.dumps({"name": name, "target": {"backend": "cuda", "arch": 90, "warp_size": 32}, "shared": 0}).encode()


def members(key: str = KEY, name: str = "add_one", cubin: bytes | None = None) -> dict[str, bytes]:
    cubin = os.urandom(64) if cubin is None else cubin
    return {f"kernels/triton/{key}/{name}.cubin": cubin, f"kernels/triton/{key}/{name}.json": metadata(name)}


def cache_files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def triton_dir():
    """Triton's cache setting, restored after a test that points it elsewhere."""
    import triton

    before, env = triton.knobs.cache.__dict__.get("dir"), os.environ.get("TRITON_CACHE_DIR")
    yield
    triton.knobs.cache.__dict__.pop("dir", None)
    if before is not None:
        triton.knobs.cache.__dict__["dir"] = before
    os.environ.pop("TRITON_CACHE_DIR", None)
    if env is not None:
        os.environ["TRITON_CACHE_DIR"] = env


PLANTED = [
    f"kernels/triton/{KEY}/cuda_utils.cpython-311-x86_64-linux-gnu.so",
    f"kernels/triton/{KEY}/__triton_launcher.so",
    f"kernels/triton/{KEY}/main.c",
    f"kernels/triton/{KEY}/add_one.py",
    f"kernels/triton/{KEY}/add_one.ptx",
    f"kernels/triton/{KEY}/__grp__add_one.json",  # group files name paths: written on install, never taken
    "kernels/payload.py",
    "kernels/triton/payload.so",
    f"kernels/triton/{KEY}/../../../escape.cubin",
    f"kernels/triton/{KEY}/sub/add_one.cubin",
    f"/kernels/triton/{KEY}/add_one.cubin",
    f"kernels/triton/{KEY[:8]}/add_one.cubin",
    f"kernels/triton/{KEY}/add one.cubin",
    "program.py",
]


@pytest.mark.parametrize("rel", PLANTED)
def test_anything_but_device_code_and_metadata_is_refused(rel, tmp_path):
    files = {**members(), rel: b"import os; os.system('touch marker')"}
    with pytest.raises(BundleError, match="not allowed"):
        parse_members(files)
    with pytest.raises(BundleError, match="not allowed"):
        check_names(files)
    with pytest.raises(BundleError, match="not allowed"):
        session.install_kernels(files, "cuda", cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists(), "a refused bundle wrote into the cache"


def test_a_kernel_needs_its_cubin_and_valid_metadata():
    cubin, meta = members()
    with pytest.raises(BundleError, match=r"add_one\.json: missing"):
        parse_members({cubin: b"\x7fELF"})
    with pytest.raises(BundleError, match="not valid JSON"):
        parse_members({cubin: b"\x7fELF", meta: b"{"})
    hip = json.dumps({"name": "add_one", "target": {"backend": "hip", "arch": "gfx90a", "warp_size": 64}})
    with pytest.raises(BundleError, match="CUDA kernel"):
        parse_members({cubin: b"\x7fELF", meta: hip.encode()})
    odd = json.loads(metadata())
    odd["__class__"] = 1  # Triton builds a namedtuple of these fields
    with pytest.raises(BundleError, match="__class__"):
        parse_members({cubin: b"\x7fELF", meta: json.dumps(odd).encode()})


def test_parse_members_pairs_files_by_kernel():
    files = {**members(KEY, "linear_kernel"), **members(OTHER, "norm_kernel"), AUTOTUNE_FILE: b"{}"}
    kernels, autotune = parse_members(files)
    assert [(k.key, k.name) for k in kernels] == [(KEY, "linear_kernel"), (OTHER, "norm_kernel")]
    assert autotune == b"{}"
    assert {rel: data for k in kernels for rel, data in k.files().items()} == {
        rel: data for rel, data in files.items() if rel != AUTOTUNE_FILE
    }


def test_install_writes_device_code_metadata_and_a_local_group(tmp_path, triton_dir):
    import triton

    files = {**members(KEY, "linear_kernel"), **members(OTHER, "norm_kernel")}
    cache = tmp_path / "cache"
    kernels = session.install_kernels(files, "cuda", cache=cache)
    assert kernels.kernels == 2 and kernels.cache_dir == cache
    assert triton.knobs.cache.dir == str(cache)
    written = cache_files(cache)
    assert set(written) == {
        f"{key}/{name}{ext}"
        for key, name in [(KEY, "linear_kernel"), (OTHER, "norm_kernel")]
        for ext in (".cubin", ".json")
    } | {f"{KEY}/__grp__linear_kernel.json", f"{OTHER}/__grp__norm_kernel.json"}
    assert written[f"{KEY}/linear_kernel.cubin"] == files[f"kernels/triton/{KEY}/linear_kernel.cubin"]
    # The group names this machine's paths: it is what Triton's lookup reads before a cache hit.
    group = json.loads(written[f"{KEY}/__grp__linear_kernel.json"])["child_paths"]
    assert group == {
        "linear_kernel.json": str(cache / KEY / "linear_kernel.json"),
        "linear_kernel.cubin": str(cache / KEY / "linear_kernel.cubin"),
    }
    manager = triton.runtime.cache.FileCacheManager(KEY)  # Triton's own lookup, as its compile() does it
    assert manager.get_group("linear_kernel.json") == group
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700


def test_install_on_cpu_writes_nothing_and_keeps_the_decisions(tmp_path):
    decisions = {"version": 1, "entries": [{"kernel": "linear", "key": ["float16", 16], "config": {"BLOCK_M": 16}}]}
    files = {**members(), AUTOTUNE_FILE: json.dumps(decisions).encode()}
    kernels = session.install_kernels(files, "cpu", cache=tmp_path / "cache")
    assert kernels.cache_dir is None and not (tmp_path / "cache").exists()
    assert kernels.tuner.frozen and kernels.tuner.lookup("linear", ("float16", 16)) == {"BLOCK_M": 16}
    with pytest.raises(BundleError, match="autotune.json"):
        session.install_kernels({AUTOTUNE_FILE: b'{"version": 7}'}, "cpu")


def test_writing_is_idempotent_and_atomic(tmp_path):
    kernels, _ = parse_members({**members(KEY), **members(OTHER, "norm_kernel")})
    cache = tmp_path / "cache"
    assert write_kernels(kernels, cache) == 6
    first = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    assert write_kernels(kernels, cache) == 0, "files already there with the same bytes were written again"
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == first
    # A changed or damaged file is replaced whole; no temporary file is left behind.
    (cache / KEY / "add_one.cubin").write_bytes(b"truncated")
    assert write_kernels(kernels, cache) == 1
    assert (cache / KEY / "add_one.cubin").read_bytes() == kernels[0].cubin
    assert sorted(p.name for p in (cache / KEY).iterdir()) == ["__grp__add_one.json", "add_one.cubin", "add_one.json"]


def test_a_link_in_the_cache_is_replaced_not_followed(tmp_path):
    kernels, _ = parse_members(members())
    cache, outside = tmp_path / "cache", tmp_path / "outside.txt"
    outside.write_bytes(b"someone else's file")
    (cache / KEY).mkdir(parents=True, mode=0o700)
    cache.chmod(0o700)
    (cache / KEY / "add_one.cubin").symlink_to(outside)
    write_kernels(kernels, cache)
    assert outside.read_bytes() == b"someone else's file"
    assert not (cache / KEY / "add_one.cubin").is_symlink()
    assert (cache / KEY / "add_one.cubin").read_bytes() == kernels[0].cubin


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_a_cache_others_can_write_is_refused(tmp_path):
    kernels, _ = parse_members(members())
    cache = tmp_path / "shared"
    cache.mkdir()
    cache.chmod(0o777)  # someone else could plant the .so files Triton builds and imports here
    with pytest.raises(KernlError, match="writable by no one else"):
        write_kernels(kernels, cache)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    with pytest.raises(KernlError, match="plain folder"):
        write_kernels(kernels, link)


def test_the_cache_is_per_triton_version_under_kernl_cache(monkeypatch, tmp_path):
    import triton

    monkeypatch.setenv("KERNL_CACHE", str(tmp_path))
    assert triton_cache.triton_cache_dir() == tmp_path / "kernels" / f"triton-{triton.__version__}"


def test_compile_counter_keeps_an_existing_listener():
    import triton

    seen = []
    before = triton.knobs.compilation.listener
    try:
        triton.knobs.compilation.listener = lambda **kw: seen.append(kw["cache_hit"])
        start = triton_cache.kernel_stats()
        triton_cache.count_compiles()  # twice: still counted once
        for hit in (False, True, True):
            triton.knobs.compilation.listener(src=None, metadata={}, metadata_group={}, times=None, cache_hit=hit)
        now = triton_cache.kernel_stats()
        assert now["compiled"] - start["compiled"] == 1 and now["cache_hits"] - start["cache_hits"] == 2
        assert seen == [False, True, True]
    finally:
        triton.knobs.compilation.listener = before
