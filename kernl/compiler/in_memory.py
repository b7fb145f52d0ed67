"""A lowered program kept in memory: it serves every bucket its export covers, through one CUDA graph a bucket."""

from __future__ import annotations

import torch

from kernl.compiler.lower import Lowered
from kernl.runtime.output import BundleOutput
from kernl.runtime.runner import Runner


class InMemoryProgram:
    """Call with a bucket and the inputs (tensors named as the program's inputs); the caller serialises calls."""

    def __init__(self, lowered: Lowered, pool: tuple | None = None) -> None:
        self.lowered = lowered
        spec = lowered.spec
        inputs = [(s["name"], getattr(torch, s["dtype"])) for s in spec.inputs]
        self.runner = Runner(lowered.bind(), lowered.weight_list(), inputs, spec.outputs, lowered.device, pool=pool)

    @property
    def pool(self) -> tuple | None:
        return self.runner.graphs.pool if self.runner.graphs is not None else None

    def covers(self, bucket: tuple[int, int]) -> bool:
        if self.lowered.mode == "static":  # sizes baked in: exactly the bucket it was exported at
            return bucket in self.lowered.buckets
        return all(bucket[i] <= max(b[i] for b in self.lowered.buckets) for i in (0, 1))

    def __call__(self, bucket: tuple[int, int], tensors: dict[str, torch.Tensor]) -> BundleOutput:
        outs = self.runner(bucket, tensors)
        return BundleOutput((spec["name"], out) for spec, out in zip(self.lowered.spec.outputs, outs))
