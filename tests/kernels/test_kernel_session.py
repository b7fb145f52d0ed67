"""Compile and load sessions: each compile saves only what it used, each bundle's decisions stay in its scope."""

import json
import threading
import uuid
from collections import defaultdict

import pytest
import torch

from kernl.errors import KernlError
from kernl.kernels import autotune_cache, session
from kernl.kernels.triton_cache import AUTOTUNE_FILE, kernel_stats, parse_members, point_triton_at

try:
    import triton.language as tl
except ImportError:  # Triton ships for Linux x86-64 only
    tl = None

A = dict(BLOCK_M=16, num_warps=4)
B = dict(BLOCK_M=64, num_warps=4)
C = dict(BLOCK_M=128, num_warps=8)
TIMES = {16: 3.0, 64: 1.0, 128: 2.0}  # B is fastest


@pytest.fixture
def fake_timer(monkeypatch):
    """Each config "takes" TIMES[BLOCK_M] ms; the timed configs are recorded."""
    timed = []

    def time_ms(fn):
        fn()
        return TIMES[timed[-1]["BLOCK_M"]]

    monkeypatch.setattr(autotune_cache, "_time_ms", time_ms)
    return timed


def _unique(name: str) -> str:
    # Kernel names unique to a test: decisions measured in this process are shared by compile sessions.
    return f"{name}-{uuid.uuid4().hex}"


def test_two_tuners_keep_separate_decisions(fake_timer):
    kernel = _unique("linear")
    first, second = autotune_cache.Tuner(), autotune_cache.Tuner()
    with autotune_cache.use(first):
        assert autotune_cache.tune(kernel, (16,), [A, B, C], fake_timer.append) == B
        assert autotune_cache.lookup(kernel, (16,)) == B
    with autotune_cache.use(second):
        assert autotune_cache.lookup(kernel, (16,)) is None
        autotune_cache.load({"version": 1, "entries": [{"kernel": kernel, "key": [16], "config": C}]})
        assert autotune_cache.tune(kernel, (16,), [A, B, C], fake_timer.append) == C
    assert first.lookup(kernel, (16,)) == B and second.lookup(kernel, (16,)) == C
    assert autotune_cache.lookup(kernel, (16,)) is None, "a scoped decision leaked into the process default"


def test_a_loaded_bundles_frozen_scope_does_not_freeze_a_later_compile(fake_timer):
    kernel = _unique("linear")
    decisions = {"version": 1, "entries": [{"kernel": kernel, "key": [16], "config": C}]}
    loaded = session.install_kernels({AUTOTUNE_FILE: json.dumps(decisions).encode()}, "cpu")
    benchmarks = autotune_cache.process_stats()["benchmarks_run"]
    with loaded.active():
        assert autotune_cache.is_frozen()
        assert autotune_cache.tune(kernel, (16,), [A, B], fake_timer.append) == C
        assert autotune_cache.tune(kernel, (32,), [A, B], fake_timer.append) == A  # untuned shape: the default
    assert loaded.stats()["defaults_used"] == 1 and loaded.stats()["hits"] == 1
    assert autotune_cache.process_stats()["benchmarks_run"] == benchmarks and fake_timer == []
    assert not autotune_cache.is_frozen()
    with session.compile_session() as compiling:
        assert not autotune_cache.is_frozen()
        assert autotune_cache.tune(kernel, (32,), [A, B, C], fake_timer.append) == B  # timed
    assert len(fake_timer) == 3 and compiling.tuner.lookup(kernel, (32,)) == B
    assert compiling.tuner.lookup(kernel, (16,)) is None, "the bundle's decisions leaked into the compile"


def test_a_scope_is_per_thread():
    loaded = session.install_kernels({}, "cpu")
    seen = []
    with loaded.active():
        worker = threading.Thread(target=lambda: seen.append(autotune_cache.current()))
        worker.start()
        worker.join()
        assert autotune_cache.current() is loaded.tuner
    assert seen[0] is not loaded.tuner


def test_a_compile_saves_only_the_decisions_it_used(fake_timer, tmp_path):
    shared, own = _unique("linear"), _unique("gated_linear")
    with session.compile_session() as first:
        autotune_cache.tune(shared, (16,), [A, B, C], fake_timer.append)
    with session.compile_session() as second:
        autotune_cache.tune(shared, (16,), [A, B, C], fake_timer.append)  # measured by the first: reused
        autotune_cache.tune(own, (16,), [A, C], fake_timer.append)
    assert len(fake_timer) == 3 + 2 and second.tuner.stats()["reused"] == 1
    second.save(tmp_path)
    saved = json.loads((tmp_path / AUTOTUNE_FILE).read_text())
    assert sorted(e["kernel"] for e in saved["entries"]) == sorted([shared, own])
    assert first.tuner.export()["entries"] == [{"kernel": shared, "key": [16], "config": B}]
    # Other candidates (a test forcing some) are another question: timed again. So is a compile without reuse.
    with session.compile_session():
        assert autotune_cache.tune(shared, (16,), [A, B], fake_timer.append) == B
    with session.compile_session(reuse=False):
        autotune_cache.tune(shared, (16,), [A, B, C], fake_timer.append)
    assert len(fake_timer) == 5 + 2 + 3
    # Timings outside compiles (the process default tuner) are never reused by one.
    autotune_cache.tune(own, (32,), [A, B, C], fake_timer.append)
    with session.compile_session() as third:
        autotune_cache.tune(own, (32,), [A, B, C], fake_timer.append)
    assert len(fake_timer) == 10 + 3 + 3 and third.tuner.stats()["reused"] == 0


def test_compile_sessions_do_not_nest():
    with session.compile_session():
        with pytest.raises(KernlError, match="already in a compile session"):
            with session.compile_session():
                pass
    with session.compile_session():  # and the first one ended cleanly
        pass


# --- Triton's in-memory kernels ---------------------------------------------------------------------


class FakeKernel:
    def __init__(self, folder, key: str, name: str):
        kernel_dir = folder / key
        kernel_dir.mkdir(parents=True, exist_ok=True)
        meta = {"name": name, "target": {"backend": "cuda", "arch": 90, "warp_size": 32}}
        (kernel_dir / f"{name}.json").write_text(json.dumps(meta))
        (kernel_dir / f"{name}.cubin").write_bytes(torch.randint(0, 255, (64,), dtype=torch.uint8).numpy().tobytes())
        (kernel_dir / f"{name}.ptx").write_text("// not shipped")
        self.metadata_group = {f"{name}.{ext}": str(kernel_dir / f"{name}.{ext}") for ext in ("json", "cubin", "ptx")}
        self.metadata_group[f"__grp__{name}.json"] = str(kernel_dir / f"__grp__{name}.json")


class FakeJITFunction:
    """Triton 3.x's layout: device_caches[device] = (kernels by specialization key, key cache, target, ...)."""

    def __init__(self):
        self.device_caches = defaultdict(self.create_binder)

    def create_binder(self):
        return ({}, {}, None, None, None)

    def launch(self, key, kernel):
        # What JITFunction.run does on a miss in memory: fetch (or compile) and keep the kernel.
        return self.device_caches[0][0].setdefault(key, kernel)


def key(i: int) -> str:
    return chr(ord("A") + i) * 52


def test_each_compile_saves_its_own_kernels_even_ones_already_in_memory(monkeypatch, tmp_path):
    linear, norm = FakeJITFunction(), FakeJITFunction()
    monkeypatch.setattr(session, "_jit_functions", lambda: [linear, norm])
    cache = tmp_path / "triton"
    k_linear, k_norm, k_other = (
        FakeKernel(cache, key(0), "linear_kernel"),
        FakeKernel(cache, key(1), "norm_kernel"),
        FakeKernel(cache, key(2), "linear_kernel"),
    )
    with session.compile_session() as first:
        linear.launch("a", k_linear)
        norm.launch("b", k_norm)
    with session.compile_session() as second:
        assert linear.device_caches[0][0] == {}, "the session started with kernels of an earlier compile"
        second_linear = FakeKernel(tmp_path / "again", key(0), "linear_kernel")  # fetched again from disk
        linear.launch("a", second_linear)
        linear.launch("c", k_other)
        second.save(tmp_path / "second")
    first.save(tmp_path / "first")
    saved = {
        n: sorted(p.relative_to(tmp_path / n).as_posix() for p in (tmp_path / n).rglob("*") if p.is_file())
        for n in ("first", "second")
    }
    assert saved["first"] == sorted(
        [AUTOTUNE_FILE]
        + [
            f"kernels/triton/{key(i)}/{n}.{ext}"
            for i, n in [(0, "linear_kernel"), (1, "norm_kernel")]
            for ext in ("cubin", "json")
        ]
    )
    assert saved["second"] == sorted(
        [AUTOTUNE_FILE] + [f"kernels/triton/{key(i)}/linear_kernel.{ext}" for i in (0, 2) for ext in ("cubin", "json")]
    )
    cubin = tmp_path / "second" / "kernels" / "triton" / key(2) / "linear_kernel.cubin"
    assert cubin.read_bytes() == (cache / key(2) / "linear_kernel.cubin").read_bytes()
    # Afterwards Triton's caches hold every kernel again, as the objects a loaded bundle may have captured.
    assert linear.device_caches[0][0] == {"a": k_linear, "c": k_other} and norm.device_caches[0][0] == {"b": k_norm}
    assert second_linear in session._retired
    files = {
        p.relative_to(tmp_path / "second").as_posix(): p.read_bytes()
        for p in (tmp_path / "second").rglob("*")
        if p.is_file()
    }
    assert len(parse_members(files)[0]) == 2, "a load refuses what a compile saved"


def test_the_session_lists_kernels_while_it_runs(monkeypatch, tmp_path):
    fn = FakeJITFunction()
    monkeypatch.setattr(session, "_jit_functions", lambda: [fn])
    with session.compile_session() as s:
        fn.launch("a", FakeKernel(tmp_path, key(3), "rotary_kernel"))
        assert [(k.key, k.name) for k in s.kernels()] == [(key(3), "rotary_kernel")]
        assert s.save(tmp_path / "bundle") == 1


# --- a real Triton kernel, compiled for sm_90 on this machine (Triton needs no GPU to compile) --------


def add_one(x_ptr, n, BLOCK: "tl.constexpr"):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)


@pytest.fixture
def compile_sm90(tmp_path):
    """triton.compile of add_one for an H100 with Triton's cache where the test says; skipped without ptxas."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(add_one)
    restores = []

    def compile_in(folder):
        restores.append(point_triton_at(folder))
        src = ASTSource(fn, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {(2,): 128})
        try:
            return triton.compile(src, target=GPUTarget("cuda", 90, 32))
        except Exception as err:  # noqa: BLE001 - no ptxas or no NVIDIA backend in this Triton build
            pytest.skip(f"Triton cannot compile for sm_90 here: {err}")

    yield compile_in
    for restore in reversed(restores):
        restore()


def test_an_installed_kernel_is_a_cache_hit_for_triton(compile_sm90, monkeypatch, tmp_path):
    fn = FakeJITFunction()
    monkeypatch.setattr(session, "_jit_functions", lambda: [fn])
    with session.compile_session(cache=tmp_path / "build") as s:
        fn.launch("add_one", compile_sm90(tmp_path / "build"))
        s.save(tmp_path / "bundle")
    files = {
        p.relative_to(tmp_path / "bundle").as_posix(): p.read_bytes()
        for p in (tmp_path / "bundle").rglob("*")
        if p.is_file()
    }
    assert sorted(rel.rsplit(".", 1)[-1] for rel in files) == ["cubin", "json", "json"]  # + autotune.json
    loaded = session.install_kernels(files, "cuda", cache=tmp_path / "machine")
    before = kernel_stats()
    kernel = compile_sm90(tmp_path / "machine")
    after = kernel_stats()
    assert after["compiled"] == before["compiled"], "Triton compiled a kernel the bundle carries"
    assert after["cache_hits"] == before["cache_hits"] + 1
    cubin = next(data for rel, data in files.items() if rel.endswith(".cubin"))
    assert kernel.kernel == cubin and kernel.metadata.name == "add_one"
    assert all(path.startswith(str(loaded.cache_dir)) for path in kernel.metadata_group.values())


def test_kernels_of_losing_configs_stay_out_of_the_bundle(monkeypatch, fake_timer, tmp_path):
    fn = FakeJITFunction()
    monkeypatch.setattr(session, "_jit_functions", lambda: [fn])
    variants = {m: FakeKernel(tmp_path / "triton", key(i), "linear_kernel") for i, m in enumerate(TIMES)}

    def run(config):  # the launcher: one kernel per config
        fake_timer.append(config)
        return fn.launch(config["BLOCK_M"], variants[config["BLOCK_M"]])

    with session.compile_session() as s:
        run(autotune_cache.tune(_unique("linear"), (16,), [A, B, C], run))
    assert s.tuner.stats()["benchmarks_run"] == 3
    assert [k.key for k in s.kernels()] == [key(1)], "kernels compiled only to be timed were saved"
    assert fn.device_caches[0][0] == {64: variants[64]}
