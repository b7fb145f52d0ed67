"""One runner for a bucketed program on one device: static buffers, pad, replay, slice, fresh outputs.

Bundles and optimize_model both run their programs through it. The caller picks the bucket and serialises
calls (the static buffers are shared).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kernl.runtime.dispatch import call_shape, fill_inputs, input_shape, slice_output
from kernl.runtime.graphs import BucketGraphs
from kernl.runtime.program import Program, own_outputs


class Runner:
    """program(device, *weights, *inputs) served per (batch, seq) bucket; through CUDA graphs when graphs=True
    on a CUDA device, each bucket captured on its first call or ahead with capture()."""

    def __init__(
        self,
        program: Program,
        weights: Sequence[torch.Tensor],
        inputs: Sequence[tuple[str, torch.dtype]],
        outputs: Sequence[dict[str, Any]],
        device: torch.device,
        *,
        graphs: bool = True,
        pool: tuple | None = None,
        scope: Callable[[], contextlib.AbstractContextManager] | None = None,
        specs: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        # scope: entered around every run of the program (e.g. the bundle's own autotune decisions).
        # specs: the inputs' manifest specs; a fixed-shape input ("dims") is [batch, *dims[1:]] in every bucket.
        self.program = program
        self.weights = list(weights)
        self.inputs = list(inputs)
        self.input_names = [name for name, _ in self.inputs]
        self.specs = list(specs) if specs is not None else [{"name": name} for name in self.input_names]
        self.outputs = list(outputs)
        self.device = device
        self.scope = scope or contextlib.nullcontext
        on_cuda = graphs and device.type == "cuda"
        self.graphs = BucketGraphs(program, weights, inputs, device, pool, self.specs) if on_cuda else None

    @property
    def timings(self) -> dict[str, float]:
        return dict(self.graphs.timings) if self.graphs is not None else {}

    def capture(self, buckets: Sequence[tuple[int, int]]) -> None:
        if self.graphs is not None:
            with self.scope():
                self.graphs.capture_all(buckets)

    def __call__(self, bucket: tuple[int, int], tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The outputs for [batch, seq] tensors (by input name, all present) run in bucket, sliced back."""
        batch, seq = call_shape(tensors, self.specs)
        real = [tensors[name].to(self.device, non_blocking=True) for name in self.input_names]
        with self.scope():
            if self.graphs is None:
                padded = [
                    torch.empty(input_shape(spec, bucket), dtype=dtype, device=self.device)
                    for spec, (_, dtype) in zip(self.specs, self.inputs)
                ]
                fill_inputs(padded, real, self.input_names)
                return self._slice(self.program(self.device, *self.weights, *padded), batch, seq)
            self.graphs.capture(bucket)
            fill_inputs(self.graphs.static_inputs(bucket), real, self.input_names)
            # The next replay overwrites what the graph wrote: outputs left there are copied out.
            sliced = self._slice(self.graphs.outputs(bucket), batch, seq)
            return own_outputs(sliced, self.graphs.graph_memory[bucket])

    def _slice(self, outs, batch: int, seq: int) -> list[torch.Tensor]:
        return [slice_output(out, spec["dims"], batch, seq) for spec, out in zip(self.outputs, outs)]
