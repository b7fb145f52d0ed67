"""The production runtime: loads bundles, dispatches calls to buckets. Never imports transformers."""

from kernl.runtime.bundle import Bundle
from kernl.runtime.load import load

__all__ = ["Bundle", "load"]
