"""A bound program: the part a CUDA graph captures (head) and the part that runs after each replay (tail)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch


class Program(NamedTuple):
    head: Callable  # (device, *weights, *inputs) -> values; what a CUDA graph captures
    tail: Callable  # (device, *weights, *values) -> outputs; runs eagerly after the head (or its replay)
    weight_count: int

    def __call__(self, device: torch.device, *args: torch.Tensor) -> tuple:
        return self.tail(device, *args[: self.weight_count], *self.head(device, *args))


def program_from_namespace(namespace: dict, weight_count: int) -> Program:
    """A program defining head() and tail() splits there; an older one (forward() only) is all head, and
    its tail hands the head's values on unchanged."""
    if callable(namespace.get("head")) and callable(namespace.get("tail")):
        return Program(namespace["head"], namespace["tail"], weight_count)

    def pass_through(device, *args):
        return args[weight_count:]

    return Program(namespace["forward"], pass_through, weight_count)


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
