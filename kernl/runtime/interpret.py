"""Run program data: each function is a list of allow-listed op calls over numbered slots, checked once at load.

Nothing from the bundle is compiled or executed as Python: a function is a loop that calls the ops the
allow-list resolved, with arguments read from slots or decoded constants. Each slot is released after its last
use, as generated code would, so a CUDA-graph capture reuses intermediate memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kernl.errors import BundleError
from kernl.runtime.ops import INVARIANTS_TARGET, resolve

_DTYPES = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
_LAYOUTS = {"strided": torch.strided}
_FORMATS = {name: getattr(torch, name) for name in ("contiguous_format", "preserve_format", "channels_last")}


class _Ref:
    __slots__ = ("slot",)

    def __init__(self, slot: int) -> None:
        self.slot = slot


def _tagged(value: dict, where: str):
    if len(value) != 1:
        raise BundleError(f"program: {where}: unknown value {value!r}")
    tag, text = next(iter(value.items()))
    if tag == "float" and text in ("inf", "-inf", "nan"):
        return float(text)
    if tag == "device" and isinstance(text, str):
        try:
            return torch.device(text)
        except RuntimeError:
            raise BundleError(f"program: {where}: bad device {text!r}") from None
    table = {"dtype": _DTYPES, "layout": _LAYOUTS, "memory_format": _FORMATS}.get(tag)
    if table is None or text not in table:
        raise BundleError(f"program: {where}: unknown value {value!r}")
    return table[text]


def _decode(value, slots: dict[str, int], where: str):
    """A JSON argument as a constant, a _Ref, or a list holding some of either."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BundleError(f"program: {where}: non-finite floats are written tagged")
        return value
    if isinstance(value, list):
        return [_decode(v, slots, where) for v in value]
    if isinstance(value, dict):
        if set(value) == {"ref"}:
            name = value["ref"]
            if not isinstance(name, str) or name not in slots:
                raise BundleError(f"program: {where} reads {name!r} before anything computes it")
            return _Ref(slots[name])
        return _tagged(value, where)
    raise BundleError(f"program: {where}: {type(value).__name__} is not a program value")


def _has_ref(value) -> bool:
    return isinstance(value, _Ref) or (isinstance(value, list) and any(_has_ref(v) for v in value))


def _reader(value) -> Callable[[list], object]:
    """A function of the slots giving value with its references filled in."""
    if isinstance(value, _Ref):
        slot = value.slot
        return lambda env: env[slot]
    if isinstance(value, list) and _has_ref(value):
        parts = [_reader(v) for v in value]
        return lambda env: [p(env) for p in parts]
    return lambda env: value


def _refs(value, out: set[int]) -> set[int]:
    if isinstance(value, _Ref):
        out.add(value.slot)
    elif isinstance(value, list):
        for v in value:
            _refs(v, out)
    return out


class Function:
    """One function of program data, callable with its parameters in order."""

    def __init__(self, name: str, data: dict, kernl_ops: dict, functions: dict[str, Callable]) -> None:
        if not isinstance(data, dict) or not {"params", "nodes", "output"} <= set(data):
            raise BundleError(f"program: function {name} needs params, nodes and output")
        params, nodes = data["params"], data["nodes"]
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params) or not isinstance(nodes, list):
            raise BundleError(f"program: function {name}: params must be names and nodes a list")
        slots: dict[str, int] = {}
        for p in params:
            if p in slots:
                raise BundleError(f"program: function {name}: parameter {p!r} twice")
            slots[p] = len(slots)
        self.name, self.n_params = name, len(params)
        steps = []
        for node in nodes:
            if not (isinstance(node, list) and len(node) == 4 and isinstance(node[0], str)):
                raise BundleError(f"program: function {name}: a node must be [name, op, args, kwargs]")
            out, target, args, kwargs = node
            where = f"{name}/{out}"
            if not isinstance(args, list) or not isinstance(kwargs, dict) or out in slots:
                raise BundleError(f"program: {where}: bad node (args a list, kwargs an object, names unique)")
            args = [_decode(a, slots, where) for a in args]
            kwargs = {k: _decode(v, slots, where) for k, v in kwargs.items()}
            if target == INVARIANTS_TARGET:
                if "invariants" not in functions or kwargs:
                    raise BundleError(f"program: {where} calls invariants, which the program does not define")
                fn = functions["invariants"]
            else:
                fn = resolve(target, len(args), list(kwargs), kernl_ops)
            slots[out] = len(slots)
            steps.append((fn, args, kwargs, slots[out]))
        output = _decode(data["output"], slots, f"{name}/output")
        self._output = _reader(output)
        self._n_slots = len(slots)
        self._steps = self._with_releases(steps, output)

    def _with_releases(self, steps: list, output) -> list:
        """Each step as (fn, read args, read kwargs, slot, slots to free after it)."""
        last: dict[int, int] = {}
        for i, (_, args, kwargs, _) in enumerate(steps):
            for slot in _refs(args, set()) | _refs(list(kwargs.values()), set()):
                last[slot] = i
        kept = _refs(output, set())
        frees: list[list[int]] = [[] for _ in steps]
        for slot, i in last.items():
            if slot not in kept:
                frees[i].append(slot)
        compiled = []
        for i, (fn, args, kwargs, slot) in enumerate(steps):
            read_kwargs = {k: _reader(v) for k, v in kwargs.items()}
            compiled.append((fn, _reader(args), read_kwargs, slot, tuple(frees[i])))
        return compiled

    def __call__(self, *args):
        if len(args) != self.n_params:
            raise TypeError(f"{self.name}() takes {self.n_params} arguments, given {len(args)}")
        env = list(args) + [None] * (self._n_slots - self.n_params)
        for fn, read_args, read_kwargs, slot, frees in self._steps:
            kwargs = {k: r(env) for k, r in read_kwargs.items()} if read_kwargs else {}
            env[slot] = fn(*read_args(env), **kwargs)
            for free in frees:
                env[free] = None
        out = self._output(env)
        return tuple(out) if isinstance(out, list) else out


class Memoized:
    """The program's invariants(): computed on a shape's first call, then kept (keyed by the non-tensor args:
    the shape values and the device)."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.cache: dict[tuple, object] = {}

    def __call__(self, *args):
        key = tuple(a for a in args if not isinstance(a, torch.Tensor))
        found = self.cache.get(key)
        if found is None:
            found = self.cache[key] = self.fn(*args)
        return found
