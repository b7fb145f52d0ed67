"""On a GPU: bundles carry only their own device code; a fresh load compiles and tunes nothing, builds Triton's
host code on this machine outside the bundle, and leaves later compiles free to tune."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

import kernl
from kernl.artifacts.manifest import manifest_digest
from kernl.kernels import autotune_cache
from kernl.kernels.triton_cache import AUTOTUNE_FILE, TRITON_DIR, check_names
from tests.models import tiny_bert, tiny_llama

LOAD_AND_COUNT = """
import json, sys, torch, kernl
from kernl.kernels import autotune_cache
from kernl.kernels.triton_cache import kernel_stats
bundle = kernl.load(sys.argv[1], cuda_graphs=sys.argv[2] == "graphs")
for batch, seq in bundle.buckets:  # every bucket once, padded and exact
    bundle(input_ids=torch.randint(0, 99, (max(1, batch - 1), max(1, seq - 3)), device="cuda"))
    bundle(input_ids=torch.randint(0, 99, (batch, seq), device="cuda"))
torch.cuda.synchronize()
print(json.dumps({"kernels": kernel_stats(), "tuning": autotune_cache.process_stats()}))
"""


def kernel_names(bundle) -> set[str]:
    return {p.stem for p in (bundle / TRITON_DIR).rglob("*.cubin")}


def kernel_keys(bundle) -> set[str]:
    return {p.parent.name for p in (bundle / TRITON_DIR).rglob("*.cubin")}


def snapshot(folder) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def mtimes(folder) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def gpu_bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("b") / "bert"
    return kernl.compile(tiny_bert(), path, buckets=[(1, 16), (4, 32)], device="cuda", dtype=torch.float16)


@pytest.mark.gpu
def test_the_bundle_carries_device_code_and_metadata_only(gpu_bundle):
    files = [p.relative_to(gpu_bundle).as_posix() for p in (gpu_bundle / "kernels").rglob("*") if p.is_file()]
    check_names(files)  # no .so, .py, .c, .ptx, group file: exactly what a load accepts
    assert kernel_names(gpu_bundle), "the bundle carries no compiled kernels"
    assert json.loads((gpu_bundle / AUTOTUNE_FILE).read_text())["entries"], "no autotune decision was saved"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["graphs", "eager"])
def test_a_fresh_load_compiles_and_tunes_nothing(gpu_bundle, tmp_path, mode):
    machine, default = tmp_path / "kernl-cache", tmp_path / "triton-default-cache"
    # A fresh process, empty caches: a kernel missing from the bundle would compile, and land in one of them.
    env = dict(os.environ, KERNL_CACHE=str(machine), TRITON_CACHE_DIR=str(default))
    before = snapshot(gpu_bundle)
    for run in range(2):
        out = subprocess.run(
            [sys.executable, "-c", LOAD_AND_COUNT, str(gpu_bundle), mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        stats = json.loads(out.stdout.strip().splitlines()[-1])
        assert stats["kernels"]["compiled"] == 0, f"load {run}: Triton compiled a kernel"
        # Every kernel the bundle carries is one its program launches, fetched once from the machine cache.
        assert stats["kernels"]["cache_hits"] == len(kernel_keys(gpu_bundle))
        assert stats["tuning"]["benchmarks_run"] == 0 and stats["tuning"]["defaults_used"] == 0
        if run == 0:
            installed = mtimes(machine)
    assert snapshot(gpu_bundle) == before, "loading wrote into the bundle"
    assert not default.exists() or not any(default.rglob("*.*")), "Triton used its default cache"
    assert kernel_keys(gpu_bundle) <= {rel.split("/")[-2] for rel in installed if "/" in rel}
    # Triton built its host code (launchers, cuda_utils) here, on this machine, beside the device code.
    assert any(rel.endswith(".so") for rel in installed)
    again = mtimes(machine)
    assert {rel: t for rel, t in again.items() if rel in installed} == installed, "a second load rewrote the cache"


@pytest.mark.gpu
def test_two_models_in_one_process_keep_their_own_kernels(tmp_path):
    def build(model, name):
        return kernl.compile(model, tmp_path / name, buckets=[(2, 16)], device="cuda", dtype=torch.float16)

    llama = build(tiny_llama(), "llama")
    bert = build(tiny_bert(), "bert")
    llama_again = build(tiny_llama(), "llama-again")  # its kernels are all in memory already
    assert "rotary_kernel" in kernel_names(llama)
    assert not kernel_names(bert) & {"rotary_kernel", "gated_linear_kernel"}, "bert's bundle has llama's kernels"
    assert kernel_keys(llama_again) == kernel_keys(llama)
    for bundle in (llama, bert, llama_again):
        out = subprocess.run(
            [sys.executable, "-c", LOAD_AND_COUNT, str(bundle), "graphs"],
            env=dict(os.environ, KERNL_CACHE=str(tmp_path / f"cache-{bundle.name}")),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        stats = json.loads(out.stdout.strip().splitlines()[-1])
        assert stats["kernels"]["compiled"] == 0 and stats["kernels"]["cache_hits"] == len(kernel_keys(bundle))


@pytest.mark.gpu
def test_a_compile_after_a_load_still_tunes(gpu_bundle, tmp_path):
    bundle = kernl.load(gpu_bundle)
    bundle(input_ids=torch.randint(0, 99, (1, 16), device="cuda"))
    assert not autotune_cache.is_frozen()
    before = autotune_cache.process_stats()
    # An MLP width no compile in this process has seen: its GEMMs must be timed, not defaulted.
    model = tiny_bert(hidden_size=64, intermediate_size=192)
    path = kernl.compile(model, tmp_path / "wide", buckets=[(2, 16)], device="cuda", dtype=torch.float16)
    after = autotune_cache.process_stats()
    assert after["benchmarks_run"] > before["benchmarks_run"]
    assert after["defaults_used"] == before["defaults_used"], "the compile ran under the loaded bundle's frozen tuner"
    keys = {tuple(e["key"]) for e in json.loads((path / AUTOTUNE_FILE).read_text())["entries"]}
    assert any(192 in key for key in keys)
    assert bundle(input_ids=torch.randint(0, 99, (4, 32), device="cuda")).last_hidden_state.shape == (4, 32, 32)


def _retarget(path, **target):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["target"].update(target)
    manifest["digest"] = manifest_digest(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.gpu
def test_foreign_architecture_fails_or_recompiles(gpu_bundle, tmp_path):
    import shutil

    copy = tmp_path / "foreign"
    shutil.copytree(gpu_bundle, copy)
    _retarget(copy, capability="7.5", gpu="Tesla T4")
    with pytest.raises(kernl.BundleError, match="compute capability 7.5"):
        kernl.load(copy)
    with pytest.warns(UserWarning, match="recompiling"):
        bundle = kernl.load(copy, recompile=True)
    assert bundle(input_ids=torch.randint(0, 99, (2, 9), device="cuda")).last_hidden_state.shape == (2, 9, 32)
