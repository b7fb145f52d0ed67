"""On a matching GPU, loading compiles no kernel and benchmarks nothing; a foreign bundle fails clearly."""

import json
import os
import subprocess
import sys

import pytest
import torch

import kernl
from kernl.artifacts.kernel_cache import cached_kernel_count
from kernl.artifacts.manifest import manifest_digest
from tests.models import tiny_bert

LOAD_AND_COUNT = """
import json, sys, torch, kernl
from kernl.kernels import autotune_cache
bundle = kernl.load(sys.argv[1])
ids = torch.randint(0, 99, (3, 20), device="cuda")
bundle(input_ids=ids)
torch.cuda.synchronize()
print(json.dumps(autotune_cache.stats()))
"""


@pytest.fixture(scope="module")
def gpu_bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("b") / "bert"
    return kernl.compile(tiny_bert(), path, buckets=[(1, 16), (4, 32)], device="cuda", dtype=torch.float16)


@pytest.mark.gpu
@pytest.mark.seal
def test_load_compiles_and_tunes_nothing(gpu_bundle):
    before = cached_kernel_count(gpu_bundle)
    assert before >= 1, "the bundle carries no compiled kernels"
    # A fresh process with an empty default cache: a kernel missing from the bundle would compile into it.
    env = dict(os.environ, TRITON_CACHE_DIR=str(gpu_bundle.parent / "empty-cache"))
    run = subprocess.run(
        [sys.executable, "-c", LOAD_AND_COUNT, str(gpu_bundle)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    assert stats.get("benchmarks_run", 0) == 0
    assert cached_kernel_count(gpu_bundle) == before, "loading compiled a kernel"
    assert not (gpu_bundle.parent / "empty-cache").exists() or not any((gpu_bundle.parent / "empty-cache").iterdir())


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
