"""bert-base with 12 buckets: build time, bundle size, time from a fresh `python -c` to the first output,
and GPU memory of the 12-bucket load against a single-bucket one.

python benchmarks/cold_start.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BUCKETS = [(b, s) for b in (1, 8, 32) for s in (32, 64, 128, 256)]

FIRST_OUTPUT = """
import time
t0 = time.perf_counter()
import os, sys, torch
t_torch = time.perf_counter()
import kernl, kernl.kernels  # the program imports the kernels (and Triton) at load anyway
t_import = time.perf_counter()
torch.cuda.init()
t_cuda = time.perf_counter()
if os.environ.get("KERNL_COLD_PROFILE"):
    import cProfile, pstats
    profiler = cProfile.Profile()
    bundle = profiler.runcall(kernl.load, sys.argv[1])
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(45)
else:
    bundle = kernl.load(sys.argv[1])
t_load = time.perf_counter()
print({k: round(v, 3) for k, v in bundle.load_timings.items()}, file=sys.stderr)
ids = torch.randint(0, 30000, (8, 100), device="cuda")
out = bundle(input_ids=ids).last_hidden_state
torch.cuda.synchronize()
t_end = time.perf_counter()
print(t_end - t0, torch.cuda.memory_reserved())
print(f"import torch {t_torch - t0:.2f} s, kernl+triton {t_import - t_torch:.2f} s, "
      f"cuda init {t_cuda - t_import:.2f} s, load+capture {t_load - t_cuda:.2f} s, "
      f"first call {t_end - t_load:.3f} s", file=sys.stderr)
"""


def fresh_process_first_output(path: Path, *, profile: bool = False) -> tuple[float, float, int]:
    """Wall time of the whole process, the time measured inside it, and the GPU memory it reserved."""
    env = {**os.environ, "KERNL_COLD_PROFILE": "1"} if profile else None
    t = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-c", FIRST_OUTPUT, str(path)], capture_output=True, text=True, check=True, env=env
    )
    wall = time.perf_counter() - t
    inside, reserved = run.stdout.split()
    print(run.stderr.strip() if profile else "\n".join(run.stderr.strip().splitlines()[-2:]), file=sys.stderr)
    return wall, float(inside), int(reserved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of kernl.load")
    args = parser.parse_args()
    from transformers import BertConfig, BertModel

    import kernl

    model = BertModel(BertConfig()).eval()
    tmp = Path(tempfile.mkdtemp())
    t = time.perf_counter()
    twelve = kernl.compile(model, tmp / "twelve", buckets=BUCKETS, dtype=torch.float16, device="cuda")
    build_s = time.perf_counter() - t
    one = kernl.compile(model, tmp / "one", buckets=[BUCKETS[-1]], dtype=torch.float16, device="cuda")
    size = sum(p.stat().st_size for p in twelve.rglob("*") if p.is_file())
    fresh_process_first_output(twelve)  # the OS file cache warm, as on a production host after deploy
    wall, inside, mem12 = fresh_process_first_output(twelve)
    _, _, mem1 = fresh_process_first_output(one)
    if args.profile:
        fresh_process_first_output(twelve, profile=True)
    result = {
        "gpu": torch.cuda.get_device_name(),
        "buckets": BUCKETS,
        "build_s": build_s,
        "bundle_mb": size / 1e6,
        "fresh_process_to_first_output_s": wall,
        "import_load_capture_first_call_s": inside,
        "gpu_reserved_12_buckets_mb": mem12 / 2**20,
        "gpu_reserved_1_bucket_mb": mem1 / 2**20,
    }
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
