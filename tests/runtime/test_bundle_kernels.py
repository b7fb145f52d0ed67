"""kernl.load's view of kernels/: refused when it holds anything but device code, installed outside the bundle."""

import json

import pytest
import torch

from kernl.errors import BundleError
from kernl.kernels import autotune_cache
from kernl.kernels.session import KernelSession
from kernl.runtime import bundle_kernels
from tests.kernels.test_triton_cache import KEY, members, triton_dir  # noqa: F401 - fixture


class Files:
    """The part of a verified bundle that bundle_scope reads: manifest, names, verified bytes."""

    def __init__(self, files: dict[str, bytes]):
        self.files = {"manifest.json": b"{}", "weights.safetensors": b"", **files}
        self.manifest = {"files": {rel: {} for rel in self.files}, "target": {"device": "cuda"}}
        self.read_ones = []

    def names(self, prefix: str = "") -> list[str]:
        return sorted(rel for rel in self.files if rel.startswith(prefix.rstrip("/") + "/"))

    def read(self, rel: str) -> bytes:
        self.read_ones.append(rel)
        return self.files[rel]


DECISIONS = {"version": 1, "entries": [{"kernel": "linear", "key": ["float16", 16], "config": {"BLOCK_M": 64}}]}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("planted", ["kernels/triton/X/cuda_utils.so", f"kernels/triton/{KEY}/add_one.py"])
def test_a_planted_file_is_refused_on_every_device(planted, device, monkeypatch, tmp_path):
    monkeypatch.setenv("KERNL_CACHE", str(tmp_path))
    monkeypatch.setattr(bundle_kernels, "check_kernels", lambda *a, **k: True)
    files = Files({**members(), planted: b"\x7fELF payload"})
    with pytest.raises(BundleError, match="not allowed"):
        bundle_kernels.bundle_scope(files, torch.device(device), recompile=False)
    assert files.read_ones == [] and list(tmp_path.iterdir()) == []


def test_cpu_loads_use_nothing_from_kernels():
    files = Files({**members(), "kernels/autotune.json": json.dumps(DECISIONS).encode()})
    assert bundle_kernels.bundle_scope(files, torch.device("cpu"), recompile=False) is None
    assert files.read_ones == []


@pytest.mark.usefixtures("triton_dir")
def test_cuda_installs_into_the_machine_cache_and_scopes_the_decisions(monkeypatch, tmp_path):
    monkeypatch.setenv("KERNL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bundle_kernels, "check_kernels", lambda *a, **k: True)
    files = Files({**members(), "kernels/autotune.json": json.dumps(DECISIONS).encode()})
    scope = bundle_kernels.bundle_scope(files, torch.device("cuda"), recompile=False)
    assert isinstance(scope, KernelSession) and scope.kernels == 1
    assert scope.cache_dir.is_relative_to(tmp_path / "cache") and (scope.cache_dir / KEY).is_dir()
    with scope():  # what the runner enters around the program
        assert autotune_cache.is_frozen() and autotune_cache.lookup("linear", ("float16", 16)) == {"BLOCK_M": 64}
    assert not autotune_cache.is_frozen() and autotune_cache.lookup("linear", ("float16", 16)) is None


def test_recompiling_for_another_gpu_installs_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("KERNL_CACHE", str(tmp_path))
    monkeypatch.setattr(bundle_kernels, "check_kernels", lambda *a, **k: False)  # recompile=True allowed it
    files = Files(members())
    assert bundle_kernels.bundle_scope(files, torch.device("cuda"), recompile=True) is None
    assert files.read_ones == [] and list(tmp_path.iterdir()) == []
