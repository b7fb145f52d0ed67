"""A loaded bundle: weights on the device, the program bound, calls dispatched to buckets."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import torch

from kernl.runtime.dispatch import check_inputs, pick_bucket
from kernl.runtime.output import BundleOutput
from kernl.runtime.program import Program, ProgramSpec
from kernl.runtime.runner import Runner

CAPTURE_MODES = ("all", "lazy")


class Bundle:
    """Call with the model's keyword inputs (input_ids=…, attention_mask=…); returns a BundleOutput."""

    def __init__(
        self,
        manifest: dict[str, Any],
        spec: ProgramSpec,
        program: Program,
        weights: list[torch.Tensor],
        device: torch.device,
        *,
        cuda_graphs: bool = True,
        capture: str = "all",
        scope: Callable[[], contextlib.AbstractContextManager] | None = None,
        tokenizer: Callable[[], Any] | None = None,
    ) -> None:
        self.manifest = manifest
        self.device = device
        self.buckets = [tuple(b) for b in manifest["buckets"]]
        self._spec = spec
        self._lock = threading.Lock()
        self._tokenizer_loader, self._tokenizer = tokenizer, None
        inputs = [(s["name"], getattr(torch, s["dtype"])) for s in spec.inputs]
        self._runner = Runner(program, weights, inputs, spec.outputs, device, graphs=cuda_graphs, scope=scope)
        # Seconds spent in each step of kernl.load (verify, weights, warm-up, capture...), for diagnosis.
        self.load_timings: dict[str, float] = {}
        if capture == "all":
            self._runner.capture(self.buckets)
            self.load_timings.update(self._runner.timings)

    def __repr__(self) -> str:
        return f"<kernl.Bundle {self.manifest.get('model')} on {self.device}, buckets {self.buckets}>"

    @property
    def tokenizer(self):
        """The bundle's tokenizer (kernl.runtime.tokenizer), or None when it was built without one."""
        if self._tokenizer_loader is not None:
            self._tokenizer, self._tokenizer_loader = self._tokenizer_loader(), None
        return self._tokenizer

    @torch.no_grad()
    def __call__(self, **inputs: torch.Tensor) -> BundleOutput:
        tensors = check_inputs(inputs, self._spec.inputs, self.buckets)
        batch, seq = next(iter(tensors.values())).shape
        bucket = pick_bucket(batch, seq, self.buckets, self._spec.input_names[0])
        with self._lock:  # one replay at a time: the static buffers are shared
            outs = self._runner(bucket, tensors)
        return BundleOutput((spec["name"], out) for spec, out in zip(self._spec.outputs, outs))
