"""The ops a bundle's program may call: a fixed allow-list, each op checked against its argument schema.

Program data names ops as "aten.<op>.<overload>", "kernl.<op>", "host.<op>" (integer math on shapes) or the
program's own hoisted "invariants". Anything else, a mutating aten overload, or arguments that do not fit the
op's schema is refused by name before anything runs.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable

import torch

from kernl.errors import BundleError

INVARIANTS_TARGET = "program.invariants"

# Integer arithmetic on sizes, and picking one result of an op that returns several.
HOST_OPS: dict[str, Callable] = {
    "host.add": operator.add,
    "host.sub": operator.sub,
    "host.mul": operator.mul,
    "host.floordiv": operator.floordiv,
    "host.mod": operator.mod,
    "host.neg": operator.neg,
    "host.getitem": operator.getitem,
}

# Functional aten ops that compute on tensors the program holds; nothing here reads or writes files, talks to
# other processes or runs Python. Wide enough for the encoder, decoder and encoder-decoder graphs kernl exports.
# conv1d/conv2d: export keeps the composite conv ops (Whisper's audio front end is two conv1d), not convolution.
ATEN_OPS = frozenset(
    """
    __and__ __or__ __xor__ __lshift__ __rshift__ _assert_scalar _assert_tensor_metadata _softmax _to_copy
    _unsafe_view abs add addmm alias all amax amin any arange argmax argmin baddbmm bitwise_and bitwise_not
    bitwise_or bmm cat ceil clamp clamp_max clamp_min clone constant_pad_nd contiguous conv1d conv2d convolution copy
    cos cumsum diff
    detach div embedding empty eq erf exp expand expand_as expm1 fill flatten flip floor floor_divide full
    full_like gather ge gelu gt index index_select isinf isnan layer_norm le lift_fresh_copy linear log log1p
    log_softmax logical_and logical_not logical_or lt masked_fill matmul max maximum mean min minimum mm mul
    native_layer_norm ne neg new_empty new_full new_ones new_zeros ones ones_like permute pow reciprocal relu
    remainder repeat reshape round rsqrt rsub scalar_tensor scaled_dot_product_attention select sigmoid sign silu
    sin slice softmax split split_with_sizes sqrt squeeze stack sub sum sym_constrain_range_for_size
    sym_numel sym_size sym_storage_offset sym_stride t tanh to topk transpose tril triu type_as unbind unflatten
    unsqueeze view where zeros zeros_like
    """.split()
)


def _aten_op(target: str) -> torch._ops.OpOverload:
    parts = target.split(".")
    if len(parts) != 3 or parts[1] not in ATEN_OPS:
        raise BundleError(f"program: op {target!r} is not in kernl's allow-list")
    overload = getattr(getattr(torch.ops.aten, parts[1]), parts[2], None)
    if not isinstance(overload, torch._ops.OpOverload):
        raise BundleError(f"program: op {target!r} does not exist in this torch")
    if overload._schema.is_mutable:
        raise BundleError(f"program: op {target!r} mutates its arguments; programs are functional")
    return overload


def _check_schema(target: str, overload: torch._ops.OpOverload, n_args: int, kwargs: list[str]) -> None:
    arguments = overload._schema.arguments
    positional = [a for a in arguments if not a.kwarg_only]
    if n_args > len(positional):
        raise BundleError(f"program: {target} takes {len(positional)} positional arguments, given {n_args}")
    names = {a.name for a in arguments}
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        raise BundleError(f"program: {target} has no argument {unknown[0]!r}")


# Hundreds of nodes call a handful of kernels: each signature is read once per process.
_signature = functools.cache(inspect.signature)


def resolve(target: str, n_args: int, kwargs: list[str], kernl_ops: dict[str, Callable]) -> Callable:
    """The callable for an op of program data, after checking its name and argument names against the allow-list.

    kernl_ops: kernl's own ops by data name (from kernl_op_table(); passed in so it is built once per load).
    """
    if not isinstance(target, str):
        raise BundleError(f"program: op {target!r} is not an op name")
    if target in HOST_OPS:
        if kwargs or n_args not in (1, 2):
            raise BundleError(f"program: {target} takes one or two positional arguments")
        return HOST_OPS[target]
    if target.startswith("aten."):
        overload = _aten_op(target)
        _check_schema(target, overload, n_args, kwargs)
        return overload
    if target in kernl_ops:
        fn = kernl_ops[target]
        try:
            _signature(fn).bind(*range(n_args), **dict.fromkeys(kwargs))
        except TypeError as err:
            raise BundleError(f"program: {target}: {err}") from None
        return fn
    raise BundleError(f"program: op {target!r} is not in kernl's allow-list")


def kernl_op_table() -> dict[str, Callable]:
    """kernl's ops as program data names them, each the plain call without the custom-op dispatcher."""
    from kernl.kernels import direct

    return {f"kernl.{name}": getattr(direct, name) for name in direct.__all__}
