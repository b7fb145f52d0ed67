"""torch.ops.kernl.* registration, deferred until the compiler (or a test) asks for it.

Registering a custom op imports parts of torch (schema inference, fake tensors) that cost a fresh process
tenths of a second; a loaded bundle never needs them, since it calls the plain functions of kernels/direct.py.
Kernel modules declare their ops with `custom_op(...)` and `@op.register_fake` as with torch.library;
`register_ops()` registers every declared op once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

_declared: list[DeferredOp] = []


class DeferredOp:
    def __init__(self, name: str, fn: Callable, mutates_args: Sequence[str]) -> None:
        self.name, self.fn, self.mutates_args = name, fn, tuple(mutates_args)
        self.fake: Callable | None = None
        self.registered = False

    def register_fake(self, fake: Callable) -> Callable:
        self.fake = fake
        return fake

    def register(self) -> None:
        if self.registered:
            return
        op = torch.library.custom_op(self.name, self.fn, mutates_args=self.mutates_args)
        if self.fake is not None:
            op.register_fake(self.fake)
        self.registered = True


def custom_op(name: str, fn: Callable, *, mutates_args: Sequence[str]) -> DeferredOp:
    """Declare fn as torch.ops.<name>; registered by register_ops()."""
    op = DeferredOp(name, fn, mutates_args)
    _declared.append(op)
    return op


def register_ops() -> None:
    """Register every torch.ops.kernl.* op (idempotent)."""
    import kernl.kernels  # noqa: F401 - every kernel module, so that every op is declared

    for op in _declared:
        op.register()
