"""optimize_model(model): the model's forward runs through kernl, in place, in memory.

Each call's (batch, seq) is rounded up to a bucket: batch to a power of two, seq to a multiple of 64 (at most
the model's positions). The first call of a new set of inputs exports and rewrites the model once, for every
bucket up to a large one; each new bucket then captures its CUDA graph (on CPU the program runs as is), and
later calls pad, replay and slice. Under autocast the program is built in the autocast dtype. A forward that
cannot be exported, or a call kernl cannot serve, runs eagerly, with one warning.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import threading
import warnings
from typing import Any

import torch

from kernl.compiler.in_memory import InMemoryProgram
from kernl.compiler.lower import lower_model
from kernl.errors import KernlError

SEQ_MULTIPLE = 64
BATCH_RANGE = 64  # one export covers batches up to this (or the call's, when larger)
# Served when False or None; asking for a cache, attentions or hidden states runs the model eagerly.
IGNORED_FLAGS = {"use_cache", "output_attentions", "output_hidden_states"}


def bucket_for(batch: int, seq: int, max_seq: int | None) -> tuple[int, int]:
    """The bucket a call runs in: batch up to a power of two, seq up to a multiple of 64, capped at max_seq."""
    rounded = -(-seq // SEQ_MULTIPLE) * SEQ_MULTIPLE
    return 1 << (batch - 1).bit_length(), min(rounded, max_seq) if max_seq else rounded


def _max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@contextlib.contextmanager
def _class_forward(model: torch.nn.Module):
    """The model's own forward while exporting or copying it (optimize_model replaced it on the instance)."""
    patched = model.__dict__.pop("forward", None)
    try:
        yield model
    finally:
        if patched is not None:
            model.forward = patched


class KernlForward:
    """What optimize_model puts in place of model.forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.original = model.forward
        self.signature = inspect.signature(self.original)
        self.max_seq = _max_positions(model)
        self.programs: dict[tuple, list[InMemoryProgram]] = {}
        self.casts: dict[torch.dtype, torch.nn.Module] = {}
        self.pool: tuple | None = None
        self.disabled = False
        self.warned: set[str] = set()
        self.lock = threading.Lock()

    def _warn(self, message: str) -> None:
        if message not in self.warned:
            self.warned.add(message)
            warnings.warn(f"kernl: {message}; running the model eagerly", stacklevel=5)

    def _tensor_inputs(self, args: tuple, kwargs: dict) -> tuple[dict[str, torch.Tensor], bool] | str:
        """The call's [batch, seq] tensors by name and whether to return a dict; or why kernl cannot serve it."""
        try:
            bound = self.signature.bind(*args, **kwargs).arguments
        except TypeError as err:
            return f"the call does not match {type(self.model).__name__}.forward ({err})"
        flat: dict[str, Any] = {}
        for name, value in bound.items():
            kind = self.signature.parameters[name].kind
            flat.update(value if kind == inspect.Parameter.VAR_KEYWORD else {name: value})
        tensors, return_dict, shape = {}, True, None
        for name, value in flat.items():
            if value is None or (name in IGNORED_FLAGS and value is False):
                continue
            if name == "return_dict" and isinstance(value, bool):
                return_dict = value
            elif not isinstance(value, torch.Tensor) or value.dim() != 2 or value.dtype.is_floating_point:
                return f"calls with {name}={_describe(value)} are not compiled"
            elif shape is not None and tuple(value.shape) != shape:
                return f"{name} has shape {tuple(value.shape)}, unlike the other inputs' {shape}"
            else:
                shape = tuple(value.shape)
                tensors[name] = value
        if not tensors:
            return "calls without [batch, seq] token inputs are not compiled"
        return tensors, return_dict

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.model.training:
            self._warn("the model is in training mode (kernl serves inference: call model.eval())")
        if self.disabled or self.model.training:
            return self.original(*args, **kwargs)
        call = self._tensor_inputs(args, kwargs)
        if isinstance(call, str):
            self._warn(call)
            return self.original(*args, **kwargs)
        tensors, return_dict = call
        batch, seq = next(iter(tensors.values())).shape
        if batch == 0 or seq == 0 or (self.max_seq and seq > self.max_seq):
            return self.original(*args, **kwargs)  # the model's own error, or its own empty output
        device = next(iter(tensors.values())).device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        bucket = bucket_for(batch, seq, self.max_seq)
        with self.lock, torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False):
            try:
                program = self._program(tensors, bucket, dtype)
                out = program(bucket, tensors)
            except Exception as err:  # noqa: BLE001 - whatever fails, the model still answers eagerly
                self.disabled = True
                self._warn(f"{type(self.model).__name__} cannot run through kernl ({_first_line(err)})")
                program = None
        if program is None:
            return self.original(*args, **kwargs)
        return out if return_dict else out.to_tuple()

    def _source(self, dtype: torch.dtype | None) -> torch.nn.Module:
        """The model in dtype (a copy, kept for later buckets) when autocast asks for another dtype."""
        param = next(iter(self.model.parameters()), None)
        if dtype is None or param is None or param.dtype == dtype:
            return self.model
        if dtype not in self.casts:
            with _class_forward(self.model):
                self.casts[dtype] = copy.deepcopy(self.model).to(dtype)
        return self.casts[dtype]

    def _program(self, tensors: dict[str, torch.Tensor], bucket: tuple[int, int], dtype) -> InMemoryProgram:
        key = (tuple(tensors), str(dtype))
        programs = self.programs.setdefault(key, [])
        for program in programs:
            if program.covers(bucket):
                return program
        model = self._source(dtype)
        example = {name: t.detach().clone() for name, t in tensors.items()}  # normal tensors, not inference ones
        device = next(iter(example.values())).device
        wide = (max(bucket[0], BATCH_RANGE), self.max_seq or bucket[1])
        config = getattr(model, "config", None)
        use_cache = getattr(config, "use_cache", None)
        try:
            with _class_forward(model):
                try:
                    lowered = lower_model(model, [bucket, wide], device=device, example_inputs=example)
                except KernlError:  # no dynamic export: a static program for this bucket alone
                    lowered = lower_model(model, [bucket], device=device, example_inputs=example)
        finally:
            if use_cache is not None:
                config.use_cache = use_cache  # lower_model turns the cache off; leave the caller's config as it was
        if lowered.device.type == "cuda" and self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()  # every bucket's graph shares it: calls are serialised
        program = InMemoryProgram(lowered, pool=self.pool)
        programs.append(program)
        return program


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"<{value.dtype} tensor of shape {tuple(value.shape)}>"
    text = repr(value)
    return text if len(text) <= 40 else f"<{type(value).__name__}>"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def optimize_model(model: torch.nn.Module) -> torch.nn.Module:
    """Make model's forward run through kernl, in place; returns model. Inference only (eval mode)."""
    if isinstance(model.__dict__.get("forward"), KernlForward):
        return model
    model.forward = KernlForward(model)
    return model
