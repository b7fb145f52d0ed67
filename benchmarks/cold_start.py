"""Cold start of bert-base with 12 buckets: build time, bundle size, and a fresh `python -c` to the first output,
against a bare `python -c "import torch; torch.cuda.init()"` timed in the same run, alternating, several times.

kernl's share = median(first output) - median(bare torch). The first load on a machine builds Triton's host
launchers into kernl's per-machine cache; it is reported apart ("first_load_on_machine_s").

python benchmarks/cold_start.py [--json OUT.json] [--runs 5] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BUCKETS = [(b, s) for b in (1, 8, 32) for s in (32, 64, 128, 256)]

BARE = "import torch; torch.cuda.init(); torch.empty(1, device='cuda'); torch.cuda.synchronize()"

FIRST_OUTPUT = """
import json, os, sys, time
t0 = time.perf_counter()
import torch
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
t_cuda = time.perf_counter()
import kernl
if os.environ.get("KERNL_COLD_PROFILE"):
    import cProfile, pstats
    profiler = cProfile.Profile()
    bundle = profiler.runcall(kernl.load, sys.argv[1], capture=sys.argv[2])
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
else:
    bundle = kernl.load(sys.argv[1], capture=sys.argv[2])
t_load = time.perf_counter()
ids = torch.randint(0, 30000, (8, 100), device="cuda")
out = bundle(input_ids=ids).last_hidden_state
torch.cuda.synchronize()
t_end = time.perf_counter()
from kernl.kernels import autotune_cache
from kernl.kernels.triton_cache import kernel_stats
counters = {**kernel_stats(), "benchmarks_run": autotune_cache.process_stats()["benchmarks_run"]}
print(json.dumps({"torch_and_cuda_s": t_cuda - t0, "kernl_import_load_s": t_load - t_cuda,
                  "first_call_s": t_end - t_load, "inside_s": t_end - t0, "reserved": torch.cuda.memory_reserved(),
                  "load_timings": bundle.load_timings, "counters": counters}))
"""


def _run(args: list[str], env: dict | None = None) -> tuple[float, str, str]:
    t = time.perf_counter()
    run = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    return wall, run.stdout, run.stderr


def first_output(path: Path, capture: str, env: dict | None = None) -> dict:
    wall, out, err = _run(["-c", FIRST_OUTPUT, str(path), capture], env)
    if env and env.get("KERNL_COLD_PROFILE"):
        print(err, file=sys.stderr)
    return {"wall_s": wall, **json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of kernl.load")
    args = parser.parse_args()
    from transformers import BertConfig, BertModel

    import kernl

    model = BertModel(BertConfig()).eval()
    tmp = Path(tempfile.mkdtemp())
    t = time.perf_counter()
    path = kernl.compile(model, tmp / "twelve", buckets=BUCKETS, dtype=torch.float16, device="cuda")
    build_s = time.perf_counter() - t
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    # A machine that never loaded a kernl bundle: an empty per-machine cache.
    env = {**os.environ, "KERNL_CACHE": str(tmp / "fresh-machine-cache")}
    first_on_machine = first_output(path, "all", env)
    shutil.rmtree(tmp / "fresh-machine-cache", ignore_errors=True)
    first_output(path, "all")  # the OS file cache and kernl's machine cache warm, as on a host after deploy

    bare, runs = [], {"all": [], "lazy": []}
    for _ in range(args.runs):  # alternate, so that drift on the machine hits every kind alike
        bare.append(_run(["-c", BARE])[0])
        for capture in runs:
            runs[capture].append(first_output(path, capture))
    if args.profile:
        first_output(path, "lazy", {**os.environ, "KERNL_COLD_PROFILE": "1"})

    bare_s = statistics.median(bare)
    result = {
        "gpu": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": _version("triton")},
        "buckets": BUCKETS,
        "build_s": build_s,
        "bundle_mb": size / 1e6,
        "bare_torch_cuda_init_s": {"median": bare_s, "all": bare},
        "first_load_on_machine_s": first_on_machine["wall_s"],
    }
    for capture, items in runs.items():
        walls = [r["wall_s"] for r in items]
        median = statistics.median(walls)
        middle = sorted(items, key=lambda r: r["wall_s"])[len(items) // 2]
        result[f"capture_{capture}"] = {
            "fresh_process_to_first_output_s": {"median": median, "all": walls},
            "kernl_share_s": median - bare_s,
            "kernl_import_load_s": statistics.median(r["kernl_import_load_s"] for r in items),
            "first_call_s": statistics.median(r["first_call_s"] for r in items),
            "gpu_reserved_mb": middle["reserved"] / 2**20,
            "load_timings_of_median_run": middle["load_timings"],
            "counters_at_load": middle["counters"],
        }
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)


def _version(name: str) -> str | None:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
