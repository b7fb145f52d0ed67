"""One CUDA graph per bucket, captured largest first into one shared memory pool."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import torch

from kernl.runtime.dispatch import input_shape
from kernl.runtime.program import Program, storages


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One stream for every warm-up and capture on a device: cuBLAS keeps a workspace per stream (tens of
    MB on Hopper), so a fresh stream per bucket would cost one workspace each."""
    return torch.cuda.Stream(device)


def _own_cublas_workspace() -> None:
    """Make the next capture allocate its cuBLAS workspace inside the graph's pool.

    torch caches one cuBLAS workspace per stream and frees them all whenever anything clears them (torch.compile's
    CUDA graphs do, before each capture). A graph that recorded a workspace from the default pool would then replay
    into freed memory. Cleared just before the capture, the workspace comes from the pool the graphs own; it stays
    the side stream's workspace afterwards, so the next bucket's warm-up reuses it instead of allocating another.
    """
    getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()


# Outputs at least this large are written by the tail outside the graph: copying 8 MiB out of graph memory
# costs ~6 µs at the H100's 3 TB/s, the order of what the tail's two or three eager launches may add to a call
# (an estimate: the crossover itself was not measured).
TAIL_OUTSIDE_BYTES = 8 << 20


class BucketGraphs:
    """Static input buffers, captured graph and static outputs for each bucket.

    Where a bucket's outputs are large, the graph captures the program's head, and outputs() replays it and
    runs the tail, whose kernels write fresh output tensors. Small outputs are cheaper to copy out than the
    tail's eager launches: the graph then captures the whole program.

    All graphs share one pool: intermediates of a graph are free again once its capture ends, so the
    next (smaller) bucket reuses that memory and N buckets cost about as much as the largest one.
    Replays must not overlap; the caller serialises them.
    """

    def __init__(
        self,
        program: Program,
        weights: Sequence[torch.Tensor],
        inputs: Sequence[tuple[str, torch.dtype]],
        device: torch.device,
        pool: tuple | None = None,
        specs: Sequence[dict] | None = None,
    ) -> None:
        # pool: another BucketGraphs' pool to share, when their replays are serialised together.
        # specs: the inputs' manifest specs (a fixed-shape input is [batch, *dims[1:]] in every bucket).
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.program = program
        self.weights = list(weights)
        self.inputs = list(inputs)
        self.specs = list(specs) if specs is not None else [{"name": name} for name, _ in self.inputs]
        self.device = device
        self.entries: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple]] = {}
        # Storage of each bucket's static inputs and head values, and of the weights: an output found there
        # is not the caller's to keep.
        self.graph_memory: dict[tuple[int, int], set[int]] = {}
        self.tail_outside: dict[tuple[int, int], bool] = {}
        self._weight_memory = storages(self.weights)
        self.timings = {"warm_s": 0.0, "capture_s": 0.0}

    def capture_all(self, buckets: Sequence[tuple[int, int]]) -> None:
        """Capture buckets largest first: each smaller one then reuses the pool memory the larger one freed."""
        for bucket in sorted(buckets, key=lambda b: b[0] * b[1], reverse=True):
            self.capture(bucket)

    def capture(self, bucket: tuple[int, int]) -> None:
        """Warm the bucket up once outside capture (kernels load, lazy CUDA state is set up), then capture it."""
        if bucket in self.entries:
            return
        program, weights, device = self.program, self.weights, self.device
        with torch.no_grad(), torch.cuda.device(device):
            static = [
                self._initial(name, dtype, input_shape(spec, bucket), device)
                for spec, (name, dtype) in zip(self.specs, self.inputs)
            ]
            start = time.perf_counter()
            side = _side_stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                out_bytes = sum(t.nbytes for t in program(device, *weights, *static))
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            warmed = time.perf_counter()
            self.timings["warm_s"] += warmed - start
            graph = torch.cuda.CUDAGraph()
            _own_cublas_workspace()
            outside = self.tail_outside[bucket] = out_bytes >= TAIL_OUTSIDE_BYTES
            with torch.cuda.graph(graph, pool=self.pool, stream=side):
                values = (program.head if outside else program)(device, *weights, *static)
            self.entries[bucket] = (graph, static, tuple(values))
            self.graph_memory[bucket] = storages(static) | storages(values) | self._weight_memory
            torch.cuda.synchronize(device)
            self.timings["capture_s"] += time.perf_counter() - warmed

    @staticmethod
    def _initial(name: str, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        # A visible mask and token 0: the capture runs the same kernels as any real call.
        fill = 1 if name == "attention_mask" else 0
        return torch.full(shape, fill, dtype=dtype, device=device)

    def static_inputs(self, bucket: tuple[int, int]) -> list[torch.Tensor]:
        return self.entries[bucket][1]

    def replay(self, bucket: tuple[int, int]) -> tuple:
        """Replay the bucket's graph; returns what it captured (the head's values, or the outputs), in
        static memory."""
        graph, _, values = self.entries[bucket]
        graph.replay()
        return values

    def outputs(self, bucket: tuple[int, int]) -> tuple:
        """The program's outputs for the static inputs: the replay, then the tail if it runs outside."""
        if not self.tail_outside[bucket]:
            return self.replay(bucket)
        return self.program.tail(self.device, *self.weights, *self.replay(bucket))
