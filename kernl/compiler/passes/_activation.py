"""Recognise an element-wise activation applied to a node, by the name the GEMM kernels' epilogue uses."""

from __future__ import annotations

import math

import torch
import torch.fx

from kernl.compiler.passes._fx import arg, is_call, only_user, other_operand, scalar_operand

aten = torch.ops.aten

_SINGLE_OPS = {aten.relu.default: "relu", aten.silu.default: "silu", aten.tanh.default: "tanh"}
_GELU = {"none": "gelu", "tanh": "gelu_tanh"}


def _close(value: float | None, want: float) -> bool:
    return value is not None and math.isclose(value, want, rel_tol=1e-6, abs_tol=1e-9)


def _expanded_gelu_tanh(x: torch.fx.Node) -> torch.fx.Node | None:
    """GPT-2's gelu_new written out: 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3))).

    Returns the node that computes it when x's users are exactly this formula's first ops.
    """
    users = list(x.users)
    if len(users) != 3:
        return None
    half = next((u for u in users if _close(scalar_operand(u, aten.mul.Tensor, x), 0.5)), None)
    cube = next((u for u in users if is_call(u, aten.pow.Tensor_Scalar) and u.args[0] is x and u.args[1] == 3), None)
    inner = next((u for u in users if is_call(u, aten.add.Tensor) and u.kwargs.get("alpha", 1) == 1), None)
    if half is None or cube is None or inner is None:
        return None
    cubed = only_user(cube)
    if cubed is None or not _close(scalar_operand(cubed, aten.mul.Tensor, cube), 0.044715):
        return None
    if set(inner.args[:2]) != {x, cubed}:
        return None
    scaled = only_user(inner)
    if scaled is None or not _close(scalar_operand(scaled, aten.mul.Tensor, inner), math.sqrt(2 / math.pi)):
        return None
    tanh = only_user(scaled)
    if not is_call(tanh, aten.tanh.default):
        return None
    plus_one = only_user(tanh)
    if plus_one is None or not _close(scalar_operand(plus_one, aten.add.Tensor, tanh), 1.0):
        return None
    out = only_user(half)
    if not is_call(out, aten.mul.Tensor) or other_operand(out, half) is not plus_one or only_user(plus_one) is not out:
        return None
    return out


def match_activation(x: torch.fx.Node) -> tuple[str, torch.fx.Node] | None:
    """(activation name, node computing act(x)) when every user of x is part of one activation, else None."""
    user = only_user(x)
    if user is not None and user.op == "call_function" and user.args and user.args[0] is x:
        if user.target in _SINGLE_OPS:
            return _SINGLE_OPS[user.target], user
        if user.target is aten.gelu.default and arg(user, 1, "approximate", "none") in _GELU:
            return _GELU[arg(user, 1, "approximate", "none")], user
    out = _expanded_gelu_tanh(x)
    return ("gelu_tanh", out) if out is not None else None
