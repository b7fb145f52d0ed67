"""A lowered program kept in memory: it serves every bucket its export covers, through one CUDA graph a bucket."""

from __future__ import annotations

import torch

from kernl.compiler.lower import Lowered
from kernl.runtime.dispatch import fill_inputs, slice_output
from kernl.runtime.graphs import BucketGraphs
from kernl.runtime.output import BundleOutput
from kernl.runtime.program import own_outputs


class InMemoryProgram:
    """Call with a bucket and the inputs (tensors named as the program's inputs); the caller serialises calls."""

    def __init__(self, lowered: Lowered, pool: tuple | None = None) -> None:
        self.lowered = lowered
        self.device = lowered.device
        self.program = lowered.bind()
        self.weights = lowered.weight_list()
        dtypes = {spec.name: spec.dtype for spec in lowered.specs}
        self.inputs = [(name, dtypes[name]) for name in lowered.input_names]
        self.pool = pool
        self.graphs: dict[tuple[int, int], BucketGraphs] = {}

    def covers(self, bucket: tuple[int, int]) -> bool:
        if self.lowered.mode == "static":  # sizes baked in: exactly the bucket it was exported at
            return bucket in self.lowered.buckets
        return all(bucket[i] <= max(b[i] for b in self.lowered.buckets) for i in (0, 1))

    def _graph(self, bucket: tuple[int, int]) -> BucketGraphs:
        if bucket not in self.graphs:
            graphs = BucketGraphs(self.program, self.weights, self.inputs, [bucket], self.device, pool=self.pool)
            self.pool = graphs.pool  # the next buckets share it: replays are serialised
            self.graphs[bucket] = graphs
        return self.graphs[bucket]

    def __call__(self, bucket: tuple[int, int], tensors: dict[str, torch.Tensor]) -> BundleOutput:
        batch, seq = next(iter(tensors.values())).shape
        real = [tensors[name].to(self.device) for name, _ in self.inputs]
        graphs = self._graph(bucket) if self.device.type == "cuda" else None
        if graphs is not None:
            padded = graphs.static_inputs(bucket)
        else:
            padded = [torch.empty(bucket, dtype=dtype, device=self.device) for _, dtype in self.inputs]
        fill_inputs(padded, real, [name for name, _ in self.inputs])
        if graphs is not None:
            outs = graphs.outputs(bucket)
        else:
            outs = self.program(self.device, *self.weights, *padded)
        specs = self.lowered.outputs
        sliced = [slice_output(out, spec["dims"], batch, seq) for spec, out in zip(specs, outs)]
        if graphs is not None:  # the next replay overwrites what the graph wrote
            sliced = own_outputs(sliced, graphs.graph_memory[bucket])
        return BundleOutput((spec["name"], out) for spec, out in zip(specs, sliced))
