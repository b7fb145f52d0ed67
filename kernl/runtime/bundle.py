"""A loaded bundle: weights on the device, the program bound, calls dispatched to buckets."""

from __future__ import annotations

import threading
from typing import Any

import torch

from kernl.runtime.dispatch import check_inputs, fill_inputs, pick_bucket, slice_output
from kernl.runtime.graphs import BucketGraphs
from kernl.runtime.output import BundleOutput
from kernl.runtime.program import Program, own_outputs


class Bundle:
    """Call with the model's keyword inputs (input_ids=…, attention_mask=…); returns a BundleOutput."""

    def __init__(
        self, manifest: dict[str, Any], program: Program, weights: list[torch.Tensor], device, *, cuda_graphs: bool
    ) -> None:
        self.manifest = manifest
        self.device = device
        self.buckets = [tuple(b) for b in manifest["buckets"]]
        self._program = program
        self._weights = weights
        self._inputs = manifest["inputs"]
        self._input_order = manifest["program"]["inputs"]
        self._outputs = manifest["outputs"]
        self._lock = threading.Lock()
        self._graphs = None
        # Seconds spent in each step of kernl.load (verify, weights, warm-up, capture...), for diagnosis.
        self.load_timings: dict[str, float] = {}
        if cuda_graphs and device.type == "cuda":
            inputs = [(name, getattr(torch, self._dtype_of(name))) for name in self._input_order]
            self._graphs = BucketGraphs(program, weights, inputs, self.buckets, device)
            self.load_timings.update(self._graphs.timings)

    def __repr__(self) -> str:
        return f"<kernl.Bundle {self.manifest.get('model')} on {self.device}, buckets {self.buckets}>"

    @torch.no_grad()
    def __call__(self, **inputs: torch.Tensor) -> BundleOutput:
        tensors = check_inputs(inputs, self._inputs, self.buckets)
        batch, seq = next(iter(tensors.values())).shape
        bucket = pick_bucket(batch, seq, self.buckets, self._input_order[0])
        real = [tensors[name].to(self.device, non_blocking=True) for name in self._input_order]
        with self._lock:  # one replay at a time: the static buffers are shared
            if self._graphs is not None:
                padded = self._graphs.static_inputs(bucket)
            else:
                padded = [torch.empty(bucket, dtype=t.dtype, device=self.device) for t in real]
            fill_inputs(padded, real, self._input_order)
            if self._graphs is not None:
                # The next replay overwrites what the graph wrote: outputs left there are copied out.
                sliced = self._slice(self._graphs.outputs(bucket), batch, seq)
                outs = own_outputs(sliced, self._graphs.graph_memory[bucket])
            else:
                outs = self._slice(self._program(self.device, *self._weights, *padded), batch, seq)
        return BundleOutput((spec["name"], out) for spec, out in zip(self._outputs, outs))

    def _slice(self, outs, batch: int, seq: int) -> list[torch.Tensor]:
        return [slice_output(out, spec["dims"], batch, seq) for spec, out in zip(self._outputs, outs)]

    def _dtype_of(self, name: str) -> str:
        return next(s["dtype"] for s in self._inputs if s["name"] == name)
