"""A loaded bundle: weights on the device, the program bound, calls dispatched to buckets."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from kernl.runtime.dispatch import check_inputs, pad_into, pick_bucket, slice_output
from kernl.runtime.output import BundleOutput


class Bundle:
    """Call with the model's keyword inputs (input_ids=…, attention_mask=…); returns a BundleOutput."""

    def __init__(self, manifest: dict[str, Any], forward: Callable, weights: list[torch.Tensor], device) -> None:
        self.manifest = manifest
        self.device = device
        self.buckets = [tuple(b) for b in manifest["buckets"]]
        self._forward = forward
        self._weights = weights
        self._inputs = manifest["inputs"]
        self._input_order = manifest["program"]["inputs"]
        self._outputs = manifest["outputs"]
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<kernl.Bundle {self.manifest.get('model')} on {self.device}, buckets {self.buckets}>"

    @torch.no_grad()
    def __call__(self, **inputs: torch.Tensor) -> BundleOutput:
        tensors = check_inputs(inputs, self._inputs, self.buckets)
        batch, seq = next(iter(tensors.values())).shape
        bucket = pick_bucket(batch, seq, self.buckets, self._input_order[0])
        padded = []
        for name in self._input_order:
            src = tensors[name].to(self.device, non_blocking=True)
            dst = torch.empty(bucket, dtype=getattr(torch, self._dtype_of(name)), device=self.device)
            pad_into(dst, src, is_mask=name == "attention_mask")
            padded.append(dst)
        with self._lock:
            outs = self._forward(self.device, *self._weights, *padded)
        return BundleOutput(
            (spec["name"], slice_output(out, spec["dims"], batch, seq)) for spec, out in zip(self._outputs, outs)
        )

    def _dtype_of(self, name: str) -> str:
        return next(s["dtype"] for s in self._inputs if s["name"] == name)
