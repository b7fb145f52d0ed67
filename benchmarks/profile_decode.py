"""Where a decode step's time goes: per-kernel device time of one greedy step of a generation bundle.

python benchmarks/profile_decode.py --model llama --batch 1 [--prompt 128]

Compiles a generation bundle (random weights), prefills one prompt, then profiles eager decode steps (the
kernels a captured step replays) with torch.profiler, and times the captured step itself for comparison.
Each kernel's achieved bandwidth is printed where its bytes are known (weights it reads).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from e2e import build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bundle", help="reuse (or write) the bundle here")
    args = parser.parse_args()
    import kernl

    path = args.bundle or os.path.join(tempfile.mkdtemp(), "bundle")
    if not os.path.exists(path):
        model = build_model(args.model, args.layers).to(getattr(torch, args.dtype))
        generation = {"max_length": args.prompt + 256, "batch_sizes": [args.batch], "seq_lens": [args.prompt]}
        kernl.compile(model, path, buckets=[], generation=generation)
        del model
    bundle = kernl.load(path)
    gen = bundle._generator
    prompts = [[5] * args.prompt] * args.batch
    req = gen.request(prompts, max_new_tokens=200, eos_token_id=[])
    rows, step = gen._start(req)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        step()
    end.record()
    end.synchronize()
    graph_ms = start.elapsed_time(end) / args.steps
    # In the bundle's scope: its own autotune decisions, as the captured step uses them.
    with torch.no_grad(), gen.scope(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            gen._decode_step(rows, True, False)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / args.steps
    print(f"{torch.cuda.get_device_name()} {args.model} batch {args.batch}: captured step {graph_ms:.3f} ms, "
          f"kernel time per eager step {total / 1e3:.3f} ms")  # fmt: skip
    print(f"{'kernel':70s} {'calls/step':>10s} {'us/step':>9s} {'us/call':>8s} {'share':>6s}")
    for e in events[:30]:
        per_step = e.device_time_total / args.steps
        print(f"{e.key[:70]:70s} {e.count / args.steps:10.1f} {per_step:9.1f} {per_step / (e.count / args.steps):8.2f} "
              f"{per_step / total:6.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
