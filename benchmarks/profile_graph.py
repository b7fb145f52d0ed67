"""What one bundle call runs on the GPU: the kernels of the captured graph, their time, and the gaps.

python benchmarks/profile_graph.py --model bert --shape 1x128 [--layers N] [--trace trace.json] [--ab pdl]

Builds a one-bucket bundle, then profiles graph replays (and the program's tail, run after each) with the
torch profiler. Prints each kernel name with its launches and GPU time per call, the sum of kernel time
against the replay's wall time (the gap is launch latency and idle), and the full call (input checks,
padding, tail, output copies) against the bare replay of the head.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from e2e import build_model, inputs_for  # noqa: E402

from kernl.commands.timing import median_ms  # noqa: E402


def kernel_table(bundle, bucket: tuple[int, int], calls: int) -> tuple[list[tuple[str, int, float]], float, object]:
    """(kernel name, launches per call, µs per call) sorted by time, and the summed kernel µs per call."""
    from torch.profiler import ProfilerActivity, profile

    graphs = bundle._runner.graphs
    for _ in range(3):
        graphs.outputs(bucket)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            graphs.outputs(bucket)  # the replay and the program's tail
        torch.cuda.synchronize()
    launches: dict[str, int] = collections.Counter()
    micros: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            launches[event.name] += 1
            micros[event.name] += event.device_time
    rows = sorted(((n, launches[n] // calls, micros[n] / calls) for n in launches), key=lambda r: -r[2])
    return rows, sum(r[2] for r in rows), prof


def host_breakdown(bundle, inputs: dict[str, torch.Tensor], bucket: tuple[int, int], calls: int = 200) -> dict:
    """Host µs per call of each step of Bundle.__call__, each timed alone with the device idle before it."""
    import time

    from kernl.runtime.dispatch import check_inputs, fill_inputs

    graphs, names = bundle._runner.graphs, bundle._runner.input_names
    static = graphs.static_inputs(bucket)
    values = graphs.replay(bucket)
    steps = {
        "check_inputs": lambda: check_inputs(inputs, bundle._spec.inputs, bundle.buckets),
        "input copies": lambda: fill_inputs(static, [inputs[n] for n in names], names),
        "graph launch": lambda: graphs.replay(bucket),
        "tail": lambda: (
            graphs.program.tail(graphs.device, *graphs.weights, *values) if graphs.tail_outside[bucket] else None
        ),
        "whole call": lambda: bundle(**inputs),
    }
    micros = {}
    for name, step in steps.items():
        total = 0.0
        for _ in range(calls):
            torch.cuda.synchronize()
            t = time.perf_counter()
            step()
            total += time.perf_counter() - t
        micros[name] = total / calls * 1e6
    return micros


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert")
    parser.add_argument("--shape", default="1x128")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--trace", type=Path, default=None, help="write a Chrome trace of the profiled replays")
    parser.add_argument(
        "--ab",
        action="append",
        choices=sorted(AB_VARIANTS),
        default=[],
        help="also load the bundle with one change and compare in this process: attention (64-row tiles only, "
        "the batch-1 16-row rule off), pdl (no programmatic dependent launch) or prefetch (PDL without the "
        "weight prefetch); repeatable",
    )
    args = parser.parse_args()
    import kernl

    batch, seq = map(int, args.shape.split("x"))
    model = build_model(args.model, args.layers)
    path = kernl.compile(model, Path(tempfile.mkdtemp()) / "bundle", buckets=[(batch, seq)], dtype=torch.float16)
    bundle = kernl.load(path)
    inputs = inputs_for(model, batch, seq)
    device = torch.device("cuda")
    with torch.inference_mode():
        call_ms = median_ms(lambda: bundle(**inputs), device, warmup=10, runs=200)
        replay_ms = median_ms(lambda: bundle._runner.graphs.replay((batch, seq)), device, warmup=10, runs=200)
        rows, kernel_us, prof = kernel_table(bundle, (batch, seq), args.calls)
        host = host_breakdown(bundle, inputs, (batch, seq))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    print(f"{args.model} {args.shape}: full call {call_ms * 1e3:.1f} µs, bare replay {replay_ms * 1e3:.1f} µs, ")
    print(f"kernels {sum(r[1] for r in rows)} per call, summed kernel time {kernel_us:.1f} µs")
    print("host µs per call: " + ", ".join(f"{k} {v:.1f}" for k, v in host.items()))
    print(f"{'µs/call':>8} {'n':>4}  kernel")
    for name, count, us in rows:
        print(f"{us:8.1f} {count:4d}  {name[:110]}")
    for which in args.ab:
        compare_variants(path, inputs, (batch, seq), args.calls, which)


@contextlib.contextmanager
def attention_64_rows_only():
    """attention_config as if there were enough programs: the batch-1 16-row branch is skipped."""
    from kernl.kernels import _attention_kernel as tiles

    rule = tiles.attention_config
    tiles.attention_config = lambda d, seq_q, bh, dtype, device: rule(d, max(seq_q, 33), max(bh, 33), dtype, device)
    try:
        yield
    finally:
        tiles.attention_config = rule


@contextlib.contextmanager
def pdl_off():
    """Kernels launched the ordinary way, without programmatic dependent launch."""
    from kernl.kernels import _pdl

    enabled = _pdl.ENABLED
    _pdl.ENABLED = False
    try:
        yield
    finally:
        _pdl.ENABLED = enabled


@contextlib.contextmanager
def prefetch_off():
    """PDL kept, but small-M GEMMs do not pull their weights into L2 before waiting for their inputs."""
    from kernl.kernels import _pdl

    _pdl.PREFETCH = False
    try:
        yield
    finally:
        _pdl.PREFETCH = True


# --ab NAME: (label of the default, label of the variant, what to change while the variant loads)
AB_VARIANTS = {
    "attention": ("16-row rule", "64-row only", attention_64_rows_only),
    "pdl": ("PDL on", "PDL off", pdl_off),
    "prefetch": ("prefetch on", "prefetch off", prefetch_off),
}


def compare_variants(path: Path, inputs: dict, bucket: tuple[int, int], calls: int, which: str) -> None:
    """The same bundle loaded twice in this process, as built and with one change made while it loads (and so
    while its graphs are captured): whole call, bare replay and summed kernel time, alternating the two in
    three rounds so that clock drift hits both alike."""
    import kernl

    default, variant, change = AB_VARIANTS[which]
    bundles = {default: kernl.load(path)}
    with change():
        bundles[variant] = kernl.load(path)
    device = torch.device("cuda")
    with torch.inference_mode():
        for round_ in range(3):
            for name, bundle in bundles.items():
                call_ms = median_ms(lambda b=bundle: b(**inputs), device, warmup=10, runs=300)
                replay_ms = median_ms(lambda b=bundle: b._runner.graphs.replay(bucket), device, warmup=10, runs=300)
                rows, kernel_us, _ = kernel_table(bundle, bucket, calls)
                attention_us = sum(us for n, _, us in rows if "attention" in n)
                print(
                    f"A/B {which} round {round_} {name}: full call {call_ms * 1e3:.1f} µs, "
                    f"replay {replay_ms * 1e3:.1f} µs, kernels {kernel_us:.1f} µs, attention {attention_us:.1f} µs"
                )


if __name__ == "__main__":
    main()
