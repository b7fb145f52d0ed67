"""The production runtime: loads bundles, dispatches calls to buckets. Never imports transformers.

Submodules load on first use, so that the compiler can use the program contract without the loader.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kernl.runtime.bundle import Bundle
    from kernl.runtime.load import load

__all__ = ["Bundle", "load"]


def __getattr__(name: str):
    # Bound here, so that the submodule kernl.runtime.load, set on the package by its import, is not returned.
    if name == "Bundle":
        from kernl.runtime.bundle import Bundle as value
    elif name == "load":
        from kernl.runtime.load import load as value
    else:
        raise AttributeError(f"module 'kernl.runtime' has no attribute {name!r}")
    globals()[name] = value
    return value
