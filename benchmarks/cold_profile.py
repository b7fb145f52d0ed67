"""Where a fresh process spends its first kernl output: cProfile of kernl.load and of the first call.

python benchmarks/cold_profile.py BUNDLE [--capture lazy|all] [--top 40]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--capture", default="lazy")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    import torch

    torch.cuda.init()
    torch.empty(1, device="cuda")
    profiler = cProfile.Profile()
    t = time.perf_counter()
    profiler.enable()
    import kernl

    bundle = kernl.load(args.bundle, capture=args.capture)
    ids = torch.randint(0, 30000, (8, 100), device="cuda")
    bundle(input_ids=ids)
    torch.cuda.synchronize()
    profiler.disable()
    print(f"import + load + first call: {time.perf_counter() - t:.3f} s; load timings {bundle.load_timings}")
    for key in ("cumulative", "tottime"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(args.top)
        print(text.getvalue())


if __name__ == "__main__":
    sys.exit(main())
