"""The program contract: what a kernl program is, for the compiler, the runtime and optimize_model alike.

A program has weights (by name, in order), inputs ({name, dtype, rank, fill}, in order), outputs ({name, dims}),
functions held as data (kernl.runtime.interpret runs them), and entry points. An entry point is a head, which a
CUDA graph captures, and an optional tail that runs after each replay so that the kernels writing the outputs
allocate them fresh. Every function takes (target_device, *weights, ...): the head then the entry's inputs,
the tail then the values the head returns. A function may call the shared `invariants` function (values that
depend only on the weights and the input shapes), which runs once per shape.

A generation program has no "forward" but a "prefill" (or, encoder-decoder, "encode") and a "decode" entry, each
with its own inputs (listed in the entry), and state: tensors the runtime allocates at load from their specs
({name, dtype, shape}: the KV cache) and passes after the weights, (target_device, *weights, *state, *inputs); its
kernels write them in place.

On disk: program.json holds {"format_version", "functions", "entries"}; the manifest holds the weights, inputs,
outputs and state; program.py beside them is a readable view that nothing runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from kernl.errors import BundleError

PROGRAM_FILE = "program.json"
PROGRAM_VIEW = "program.py"
PROGRAM_FORMAT = 1
FORWARD = "forward"
GENERATION_ENTRIES = ("prefill", "decode")
SEQ2SEQ_ENTRIES = ("encode", "decode")  # encoder-decoder generation: encode fills the cross-attention caches


class Program(NamedTuple):
    """One bound entry point."""

    head: Callable  # (device, *weights, *inputs) -> values; what a CUDA graph captures
    tail: Callable  # (device, *weights, *values) -> outputs; runs eagerly after the head (or its replay)
    weight_count: int

    def __call__(self, device: torch.device, *args: torch.Tensor) -> tuple:
        return self.tail(device, *args[: self.weight_count], *self.head(device, *args))


@dataclass
class ProgramSpec:
    weights: list[str]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    functions: dict[str, dict]
    # entry -> {"head": function name, "tail": function name or None}, and for generation entries "inputs" (their
    # input specs) and "state": true (the state tensors come after the weights).
    entries: dict[str, dict[str, Any]]
    state: list[dict[str, Any]] = field(default_factory=list)

    @property
    def input_names(self) -> list[str]:
        return [spec["name"] for spec in self.inputs]

    def entry_inputs(self, entry: str) -> list[dict[str, Any]]:
        """The input specs of an entry: the program's inputs for forward, the entry's own otherwise."""
        spec = self.entries.get(entry) or {}
        return spec.get("inputs", self.inputs) if entry != FORWARD else self.inputs

    def allocate_state(self, device: torch.device) -> list[torch.Tensor]:
        """Zero-filled state tensors (the KV cache) on device, in program order."""
        return [torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"]), device=device) for s in self.state]

    def data(self) -> dict[str, Any]:
        """program.json's content."""
        return {"format_version": PROGRAM_FORMAT, "functions": self.functions, "entries": self.entries}

    def manifest_entries(self) -> dict[str, Any]:
        """What the manifest says of the program (its "inputs", "outputs" and "program" keys)."""
        program = {"file": PROGRAM_FILE, "view": PROGRAM_VIEW, "weights": self.weights, "inputs": self.input_names}
        if self.state:
            program["state"] = self.state
        return {"inputs": self.inputs, "outputs": self.outputs, "program": program}

    @classmethod
    def from_bundle(cls, manifest: dict[str, Any], data: Any) -> ProgramSpec:
        """The spec of a bundle, from its manifest and its parsed program.json; BundleError when malformed."""
        if not isinstance(data, dict) or data.get("format_version") != PROGRAM_FORMAT:
            raise BundleError(f"{PROGRAM_FILE}: not a kernl program of format {PROGRAM_FORMAT}")
        functions, entries = data.get("functions"), data.get("entries")
        has_entry = isinstance(entries, dict) and (
            FORWARD in entries or any(all(e in entries for e in kind) for kind in (GENERATION_ENTRIES, SEQ2SEQ_ENTRIES))
        )
        if not isinstance(functions, dict) or not has_entry:
            raise BundleError(f"{PROGRAM_FILE}: needs functions and a {FORWARD!r} entry, prefill and decode, or "
                              "encode and decode")  # fmt: skip
        program = manifest["program"]
        by_name = {spec.get("name"): spec for spec in manifest["inputs"]}
        try:
            inputs = [by_name[name] for name in program["inputs"]]
        except KeyError as err:
            raise BundleError(f"manifest.json: program input {err} has no spec") from None
        state = program.get("state", [])
        for spec in state:
            ok = isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("shape"), list)
            if (
                not ok
                or not all(isinstance(d, int) and d >= 0 for d in spec["shape"])
                or not _is_dtype(spec.get("dtype"))
            ):
                raise BundleError(f"manifest.json: bad state spec {spec!r}")
        return cls(list(program["weights"]), inputs, list(manifest["outputs"]), functions, entries, list(state))

    def bind(self, entry: str = FORWARD) -> Program:
        """The entry point as callables; checks every op of every function against the allow-list first."""
        from kernl.runtime.interpret import Function, Memoized
        from kernl.runtime.ops import kernl_op_table

        kernl_ops = kernl_op_table()
        bound: dict[str, Callable] = {}
        if "invariants" in self.functions:
            bound["invariants"] = Memoized(Function("invariants", self.functions["invariants"], kernl_ops, {}))
        for name, fn in self.functions.items():
            if name != "invariants":
                bound[name] = Function(name, fn, kernl_ops, bound)
        spec = self.entries.get(entry)
        if not isinstance(spec, dict) or spec.get("head") not in bound:
            raise BundleError(f"{PROGRAM_FILE}: entry {entry!r} has no head function")
        head, tail_name, weight_count = bound[spec["head"]], spec.get("tail"), len(self.weights)
        n_state = len(self.state) if spec.get("state") else 0
        n_inputs = len(self.entry_inputs(entry))
        if head.n_params != 1 + weight_count + n_state + n_inputs:
            raise BundleError(f"{PROGRAM_FILE}: {spec['head']} takes {head.n_params} parameters, not device + "
                              f"{weight_count} weights + {n_state} state + {n_inputs} inputs")  # fmt: skip
        if tail_name is None:
            return Program(head, _pass_through(weight_count), weight_count)
        if tail_name not in bound:
            raise BundleError(f"{PROGRAM_FILE}: entry {entry!r} names a missing tail {tail_name!r}")
        return Program(head, bound[tail_name], weight_count)


def _is_dtype(name) -> bool:
    return isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype)


def _pass_through(weight_count: int) -> Callable:
    def tail(device, *args):
        return args[weight_count:]

    return tail


def storages(tensors: Sequence) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


def own_outputs(outputs: Sequence[torch.Tensor], graph_memory: set[int]) -> list[torch.Tensor]:
    """Copy the outputs that live in a graph's static memory (the next replay overwrites it); the tail's
    fresh outputs are returned as they are. A padded output, sliced, is made compact."""
    in_graph = [i for i, out in enumerate(outputs) if out.untyped_storage().data_ptr() in graph_memory]
    owned = [out if i in in_graph else out.contiguous() for i, out in enumerate(outputs)]
    if in_graph:
        copies = [torch.empty(outputs[i].shape, dtype=outputs[i].dtype, device=outputs[i].device) for i in in_graph]
        # One launch for all of them: at batch 1 each separate clone costs more host time than GPU time.
        torch._foreach_copy_(copies, [outputs[i] for i in in_graph])
        for i, copy in zip(in_graph, copies):
            owned[i] = copy
    return owned
