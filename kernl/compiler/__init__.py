"""The compile side: tracing, rewrite passes, program generation, warm-up. Imports transformers-land code."""

from kernl.compiler.build import compile_model

__all__ = ["compile_model"]
