"""Benchmark conventions: `test_benchmark_*` tests, an `implementation` parameter, CUDA-event timing.

`measure(fn, flops=..., bytes_moved=...)` times fn with CUDA events (median after warm-up) and records
the time, TFLOP/s and GB/s, and the fraction of the machine's measured ceilings, in the benchmark's
extra_info, so that `--benchmark-json` carries everything the results table needs.
"""

import pytest
import torch

CUDA = torch.cuda.is_available()


def _events_median(fn, reps: int) -> float:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


def median_ms(fn, *, warmup: int = 10, reps: int = 100, graph: bool = True) -> float:
    """Median GPU time of fn in ms, with CUDA events, after warm-up.

    With graph (the default), fn is captured once in a CUDA graph and its replays are timed: that is how
    kernl runs in production, and it measures the kernels rather than Python's launch overhead, for
    kernl and torch alike. Functions that cannot be captured are timed as plain calls.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            for _ in range(3):
                g.replay()
            return _events_median(g.replay, reps)
        except RuntimeError:
            torch.cuda.synchronize()
    return _events_median(fn, reps)


@pytest.fixture(scope="session")
def ceilings():
    """Copy bandwidth (read + write) and fp16 matmul rate measured on this GPU, once a session."""
    if not CUDA:
        pytest.skip("benchmarks need a CUDA GPU")
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), reps=30, graph=False)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    mm_ms = median_ms(lambda: a @ b, reps=30, graph=False)
    return {"copy_gbs": 2 * src.numel() / copy_ms / 1e6, "matmul_tflops": 2 * 8192**3 / mm_ms / 1e9}


@pytest.fixture
def measure(benchmark, ceilings):
    def run(fn, *, flops: float = 0.0, bytes_moved: float = 0.0) -> float:
        ms = median_ms(fn)
        info = benchmark.extra_info
        info["median_ms"] = ms
        if flops:
            info["tflops"] = flops / ms / 1e9
            info["fraction_of_matmul_peak"] = info["tflops"] / ceilings["matmul_tflops"]
        if bytes_moved:
            info["gbs"] = bytes_moved / ms / 1e6
            info["fraction_of_copy_bandwidth"] = info["gbs"] / ceilings["copy_gbs"]
        info.update({f"ceiling_{k}": v for k, v in ceilings.items()})
        # pytest-benchmark's own rounds, for its grouping and table; synchronised so they time the GPU too.
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=20, warmup_rounds=2)
        return ms

    return run
